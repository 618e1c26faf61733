"""networks/util.py: the parameter counts of the run records and the baselines, and the state_dict fit check."""
import torch
import torch.nn as nn

from apphub_vit.records import count_parameters as records_count_parameters
from networks.util import count_parameters, non_finite, state_dict_mismatches


def test_count_parameters_totals_trainable_and_per_model_with_shared_parameters_once():
    encoder, head = nn.Linear(4, 3), nn.Linear(3, 2)  # 15 and 8 parameters
    head.bias.requires_grad_(False)
    shared = nn.Sequential(encoder, nn.ReLU())  # holds encoder's parameters too
    shared.model_name = "shared"
    counts = count_parameters([encoder, head, shared])
    assert counts["total"] == 15 + 8 and counts["trainable"] == 15 + 6  # encoder's 15 counted once
    assert counts["per_model"] == {"Linear_0": {"total": 15, "trainable": 15},
                                   "Linear_1": {"total": 8, "trainable": 6},
                                   "shared": {"total": 15, "trainable": 15}}
    tied = nn.Sequential(encoder, nn.ReLU(), encoder)  # a module used twice: its parameters once
    assert count_parameters([tied])["total"] == 15
    assert count_parameters(head) == count_parameters([head])  # one model
    assert count_parameters(shared)["per_model"] == {"shared": {"total": 15, "trainable": 15}}
    assert count_parameters([]) == {"total": 0, "trainable": 0, "per_model": {}}
    assert records_count_parameters is count_parameters  # the run records count with the same function


def test_state_dict_mismatches_names_missing_unexpected_and_shapes():
    own = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).state_dict()
    assert state_dict_mismatches(own, own) == []
    assert state_dict_mismatches(own, {k: v.clone() for k, v in own.items()}) == []
    other = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(3), "1.weight": torch.zeros(2, 3),
             "2.weight": torch.zeros(1)}
    assert state_dict_mismatches(own, other) == ["missing ['1.bias']", "unexpected ['2.weight']",
                                                 "0.weight: loaded (5, 4) vs model (3, 4)"]
    named = state_dict_mismatches(own, other, loaded_name="pretrained")
    assert named[2] == "0.weight: pretrained (5, 4) vs model (3, 4)"
    many = {f"layer{i}.weight": torch.zeros(1) for i in range(12)}
    parts = state_dict_mismatches(many, {})
    assert parts == [f"missing {sorted(many)[:5]}"]  # at most 5 keys of each kind
    wrong_shapes = state_dict_mismatches(many, {k: torch.zeros(2) for k in many})
    assert len(wrong_shapes) == 5 and all(p.endswith("loaded (2,) vs model (1,)") for p in wrong_shapes)
    assert state_dict_mismatches(many, {k: torch.zeros(2) for k in many}, limit=2) == wrong_shapes[:2]


def test_state_dict_mismatches_is_what_strict_loading_accepts():
    model = nn.Linear(4, 3)
    fits = nn.Linear(4, 3).state_dict()
    assert state_dict_mismatches(model.state_dict(), fits) == []
    model.load_state_dict(fits)  # strict: the empty answer means this works
    for bad in ({"weight": fits["weight"]}, dict(fits, extra=torch.zeros(1)), dict(fits, bias=torch.zeros(4))):
        assert state_dict_mismatches(model.state_dict(), bad)
        try:
            model.load_state_dict(bad)
        except RuntimeError:
            pass
        else:
            raise AssertionError(f"strict loading accepted {sorted(bad)}")


def test_non_finite_names_the_tensors_holding_nan_or_inf_and_ignores_integers():
    state = {"w": torch.ones(2), "b": torch.tensor([1.0, float("nan")]), "s": torch.tensor(float("inf")),
             "n": torch.tensor([3])}
    assert non_finite(state) == ["b", "s"]
    assert non_finite({"w": torch.zeros(3)}) == []

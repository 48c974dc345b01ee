"""Strings from data become MLflow names: every one valid, readable and unique."""

import pytest
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_metric_name, _validate_param_name, _validate_tag_name

from components.tracking import Tracker, safe_name, safe_names

pytestmark = pytest.mark.unit

# BANKING77's own label, and the characters users' labels carry: "/", ":", spaces, non-ASCII letters, dots.
LABELS = [
    "reverted_card_payment?",
    "card/lost",
    "fx:rate",
    "top up failed",
    "carte_perdue_é",
    "card?",
    "card!",
    "card_",
    "..",
    ".hidden",
    "a" * 300,
    "ünïcode ∑ sign",
]


@pytest.mark.parametrize("validate", [_validate_metric_name, _validate_param_name, _validate_tag_name])
def test_every_label_maps_to_a_name_mlflow_accepts(validate):
    with pytest.raises(MlflowException):  # the failure this guards against, as MLflow reports it
        validate("eval.tuned.f1.reverted_card_payment?")
    names, _ = safe_names({f"eval.tuned.f1.{label}": 1.0 for label in LABELS})
    for name in names:
        validate(name)
        assert len(name) <= 250


def test_names_stay_readable_and_valid_ones_stay_unchanged():
    assert safe_name("eval.tuned.f1.card_arrival") == "eval.tuned.f1.card_arrival"
    assert safe_name("reverted_card_payment?") == "reverted_card_payment_"
    assert safe_name("card/lost") == "card_lost" and safe_name("fx:rate") == "fx_rate"
    assert safe_name("carte_perdue_é") == "carte_perdue_é"  # letters of any script are word characters


def test_labels_that_sanitise_alike_get_distinct_stable_names():
    data = {"f1.card?": 1.0, "f1.card!": 2.0, "f1.card_": 3.0}
    names, renamed = safe_names(data)
    assert len(names) == 3 and sorted(names.values()) == [1.0, 2.0, 3.0]  # nothing overwritten
    assert names["f1.card_"] == 3.0  # the one that was valid keeps its name
    assert {renamed[n] for n in names if n != "f1.card_"} == {"f1.card?", "f1.card!"}
    assert safe_names(dict(reversed(list(data.items()))))[0].keys() == names.keys()  # order does not matter


def test_tracker_sanitises_metrics_params_and_tags_and_keeps_the_originals():
    logged = {}

    class FakeMlflow:
        def log_metrics(self, metrics, step=None):
            logged["metrics"] = metrics

        def log_params(self, params):
            logged["params"] = params

        def set_tags(self, tags):
            logged["tags"] = tags

        def log_dict(self, data, name):
            logged[name] = data

    tracker = Tracker(FakeMlflow(), "run")
    tracker.log_metrics({"f1.card?": 0.5})
    tracker.log_params({"labels": {"fx:rate": "x"}})
    tracker.set_tags({"label.top up?": "yes"})
    tracker.log_renames()
    assert logged["metrics"] == {"f1.card_": 0.5} and logged["params"] == {"labels.fx_rate": "x"}
    assert logged["tags"] == {"label.top up_": "yes"}
    assert logged["metric_names.json"] == {
        "f1.card_": "f1.card?",
        "labels.fx_rate": "labels.fx:rate",
        "label.top up_": "label.top up?",
    }

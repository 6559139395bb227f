import random

import pytest
import yaml

from src.safety.constitutional.judging.constitution import (DEFAULT_CONSTITUTION_PATH, ConstitutionError,
                                                            load_constitution, parse_constitution)

GOOD = {"name": "no_harm", "description": "Do not harm.", "critique_request": "Identify harm.",
        "revision_request": "Remove harm."}


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_default_constitution_covers_required_topics():
    c = load_constitution()
    assert c.source == str(DEFAULT_CONSTITUTION_PATH)
    for name in ["harmless", "harm_violence", "harm_weapons", "harm_crime", "harm_self_harm", "harm_cyber", "harm_fraud",
                 "honesty", "privacy", "fairness", "helpfulness"]:
        p = c.get(name)
        assert p.critique_request and p.revision_request and p.weight > 0
    assert c.get("helpfulness").applies_to == "benign"
    assert {ex["principle"] for ex in c.few_shot} <= set(c.names)
    assert len(c.few_shot) >= 3


def test_sample_is_weighted_and_reproducible():
    c = load_constitution()
    draws = [c.sample(random.Random(7)).name for _ in range(3)]
    assert len(set(draws)) == 1
    rng = random.Random(0)
    counts = {}
    for _ in range(4000):
        name = c.sample(rng).name
        counts[name] = counts.get(name, 0) + 1
    # helpfulness has weight 1.5, the others 1.0
    assert counts["helpfulness"] / counts["honesty"] == pytest.approx(1.5, rel=0.2)
    assert all(c.sample(rng, kind="harmful").name != "helpfulness" for _ in range(200))


def test_get_unknown_principle_lists_known_ones():
    with pytest.raises(KeyError, match="harm_violence"):
        load_constitution().get("nope")


@pytest.mark.parametrize("change, field", [
    ({"weight": -1}, "weight"),
    ({"weight": "heavy"}, "weight"),
    ({"category": "vibes"}, "category"),
    ({"applies_to": "sometimes"}, "applies_to"),
    ({"evaluators": ["oracle"]}, "evaluators"),
    ({"critique_request": ""}, "critique_request"),
    ({"patterns": ["(unclosed"]}, "patterns"),
    ({"colour": "red"}, "colour"),
])
def test_bad_field_names_file_principle_and_field(tmp_path, change, field):
    path = write(tmp_path, {"principles": [GOOD, {**GOOD, "name": "second", **change}]})
    with pytest.raises(ConstitutionError) as err:
        load_constitution(path)
    message = str(err.value)
    assert str(path) in message and "'second'" in message and f"'{field}'" in message
    assert err.value.principle == "second" and err.value.field == field


def test_missing_field_and_unnamed_principle(tmp_path):
    bad = dict(GOOD)
    del bad["revision_request"]
    with pytest.raises(ConstitutionError, match=r"principle 'no_harm': field 'revision_request': missing"):
        load_constitution(write(tmp_path, {"principles": [bad]}))
    with pytest.raises(ConstitutionError, match=r"principle '#2': field 'name'"):
        load_constitution(write(tmp_path, {"principles": [GOOD, {"description": "x"}]}))


def test_file_level_errors(tmp_path):
    with pytest.raises(ConstitutionError, match="does not exist"):
        load_constitution(tmp_path / "missing.yaml")
    path = write(tmp_path, "principles: [unclosed", "broken.yaml")
    with pytest.raises(ConstitutionError, match="broken.yaml: not valid YAML"):
        load_constitution(path)
    with pytest.raises(ConstitutionError, match="field 'principles'"):
        load_constitution(write(tmp_path, {"principles": []}))
    with pytest.raises(ConstitutionError, match="'no_harm': field 'name': duplicate"):
        load_constitution(write(tmp_path, {"principles": [GOOD, GOOD]}))
    shot = {"prompt": "p", "response": "r", "principle": "ghost", "critique": "c", "revision": "v"}
    with pytest.raises(ConstitutionError, match="few_shot #1': field 'principle'"):
        parse_constitution({"principles": [GOOD], "few_shot": [shot]}, "x.yaml")


def test_user_constitution_replaces_default(tmp_path):
    c = load_constitution(write(tmp_path, {"principles": [{**GOOD, "evaluators": "rules", "weight": 2}]}))
    assert c.names == ["no_harm"] and c.principles[0].evaluators == ["rules"] and c.principles[0].weight == 2.0
    assert c.principles[0].question.startswith("Does the assistant")

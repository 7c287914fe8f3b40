import datetime as dt

import pytest

from provenance.policy import (OptOutRegistry, RunPurpose, check_license, covers_territory, decide,
                               normalize_isrc, parse_bool, parse_territories)
from provenance.records import Purpose, RejectionReason

TODAY = dt.date(2026, 11, 21)


def licence(**overrides):
    base = {"license_id": "L1", "territories": ["WORLDWIDE"], "valid_from": dt.date(2020, 1, 1),
            "valid_until": None, "ai_training": "allowed", "commercial_use": True}
    return {**base, **overrides}


COMMERCIAL = RunPurpose(Purpose.COMMERCIAL, "Worldwide", TODAY)
NON_COMMERCIAL = RunPurpose(Purpose.NON_COMMERCIAL, "Worldwide", TODAY)


def test_admits_a_licence_that_allows_everything():
    assert check_license(licence(), COMMERCIAL).admitted


@pytest.mark.parametrize("overrides, run, reason", [
    ({"ai_training": "denied"}, NON_COMMERCIAL, RejectionReason.LICENSE_DENIES_AI_TRAINING),
    ({"commercial_use": False}, COMMERCIAL, RejectionReason.LICENSE_NOT_COMMERCIAL),
    ({"territories": ["US", "CA"]}, COMMERCIAL, RejectionReason.LICENSE_TERRITORY),
    ({"territories": ["WORLDWIDE", "-KP"]}, COMMERCIAL, RejectionReason.LICENSE_TERRITORY),
    ({"valid_from": dt.date(2027, 1, 1)}, COMMERCIAL, RejectionReason.LICENSE_NOT_YET_VALID),
    ({"valid_until": dt.date(2026, 11, 20)}, COMMERCIAL, RejectionReason.LICENSE_EXPIRED),
])
def test_refusals_name_their_reason(overrides, run, reason):
    decision = check_license(licence(**overrides), run)
    assert not decision.admitted
    assert decision.reason is reason
    assert "L1" in decision.detail


def test_non_commercial_licence_admitted_for_non_commercial_run_only():
    nc = licence(commercial_use=False)
    assert check_license(nc, NON_COMMERCIAL).admitted
    assert not check_license(nc, COMMERCIAL).admitted


def test_validity_bounds_are_inclusive():
    assert check_license(licence(valid_from=TODAY, valid_until=TODAY), COMMERCIAL).admitted


def test_territories():
    assert parse_territories("Worldwide; -KP") == ["WORLDWIDE", "-KP"]
    assert parse_territories("US, GB") == ["US", "GB"]
    assert covers_territory(["US", "GB"], "gb")
    assert not covers_territory(["US", "GB"], "FR")
    assert covers_territory(["WORLDWIDE", "-KP"], "FR")
    assert not covers_territory(["WORLDWIDE", "-KP"], "KP")
    assert not covers_territory(["US"], "Worldwide")
    us_run = RunPurpose(Purpose.COMMERCIAL, "US", TODAY)
    assert check_license(licence(territories=["US"]), us_run).admitted


def test_unknown_licence():
    decision = decide({"track_id": "t", "license_id": "nope"}, {"L1": licence()}, COMMERCIAL)
    assert decision.reason is RejectionReason.UNKNOWN_LICENSE


def test_opt_out_always_wins_over_a_licence():
    registry = OptOutRegistry.from_rows([
        {"kind": "rights_holder", "value": "Kevin MacLeod"},
        {"kind": "isrc", "value": "us-s1z-99-00001"},
        {"kind": "track_id", "value": "t9"},
    ])
    licences = {"L1": licence()}
    base = {"track_id": "t1", "license_id": "L1", "rights_holder": "Someone", "isrc": ""}
    assert decide(base, licences, COMMERCIAL, registry).admitted
    for change in ({"rights_holder": "kevin macleod"}, {"isrc": "USS1Z9900001"}, {"track_id": "t9"}):
        decision = decide({**base, **change}, licences, COMMERCIAL, registry)
        assert decision.reason is RejectionReason.OPTED_OUT, change


def test_opt_out_registry_content_id_names_the_registry_not_its_spelling_or_order():
    rows = [{"kind": "rights_holder", "value": "Kevin MacLeod"}, {"kind": "isrc", "value": "us-s1z-99-00001"}]
    same = [{"kind": "isrc", "value": "USS1Z9900001"}, {"kind": "rights_holder", "value": "kevin macleod"}]
    registry = OptOutRegistry.from_rows(rows)
    assert registry.content_id() == OptOutRegistry.from_rows(same).content_id()
    assert registry.content_id().startswith("optouts-") and len(registry.content_id()) == len("optouts-") + 16
    more = OptOutRegistry.from_rows([*rows, {"kind": "track_id", "value": "t9"}])
    assert more.content_id() != registry.content_id() != OptOutRegistry().content_id()
    # a track id and an ISRC with the same text are different opt-outs
    assert (OptOutRegistry.from_rows([{"kind": "track_id", "value": "USS1Z9900001"}]).content_id()
            != OptOutRegistry.from_rows([{"kind": "isrc", "value": "USS1Z9900001"}]).content_id())


def test_opt_out_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="row 1"):
        OptOutRegistry.from_rows([{"kind": "label", "value": "x"}])


def test_small_parsers():
    assert normalize_isrc(" us-s1z-99-00001 ") == "USS1Z9900001"
    assert parse_bool("TRUE", "x") and not parse_bool("false", "x")
    with pytest.raises(ValueError, match="commercial_use"):
        parse_bool("maybe", "commercial_use")


def test_isrc_and_iswc_validation():
    from provenance.policy import check_isrc, check_iswc, normalize_iswc

    assert check_isrc("USS1Z9900001") is None
    for junk in ("USS1Z990000", "US-S1Z-99-00001", "12S1Z9900001", "USS1Z99ABCDE"):
        assert check_isrc(junk), junk
    assert check_iswc("T-034.524.680-1") is None  # ISO 15707 example
    assert check_iswc("T0345246801") is None
    assert "expected 1" in check_iswc("T-034.524.680-2")
    assert check_iswc("T-34.524.680-1")
    assert normalize_iswc("t0345246801") == "T-034.524.680-1"


def test_explain_lists_every_check_not_only_the_first_failure():
    from provenance.policy import explain

    checks = explain({"track_id": "t", "license_id": "L1", "rights_holder": "H"},
                     {"L1": licence(commercial_use=False, valid_until=dt.date(2020, 6, 1))}, COMMERCIAL)
    by_name = {c.name: c for c in checks}
    assert [c.name for c in checks] == ["opt-out registry", "AI training", "commercial use", "territory",
                                        "valid from", "valid until"]
    assert not by_name["commercial use"].passed and not by_name["valid until"].passed
    assert by_name["valid until"].reason is RejectionReason.LICENSE_EXPIRED
    assert by_name["AI training"].passed and by_name["territory"].passed
    # decide() agrees with the first failing check
    first_failure = next(c for c in checks if not c.passed)
    assert decide({"track_id": "t", "license_id": "L1"}, {"L1": licence(commercial_use=False,
                  valid_until=dt.date(2020, 6, 1))}, COMMERCIAL).reason is first_failure.reason

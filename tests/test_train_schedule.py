import pytest

from codefoundry.config import parse_curriculum
from codefoundry.errors import UserError
from codefoundry.train.schedule import curriculum_seq_len, lr_factor


def test_wsd_warms_up_holds_then_decays_to_the_floor():
    f = [lr_factor(s, 100, 10, "wsd", decay_fraction=0.2, min_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[10:80])
    assert all(a > b for a, b in zip(f[80:], f[81:]))
    assert lr_factor(100, 100, 10, "wsd", 0.2, 0.1) == pytest.approx(0.1)


def test_cosine_falls_monotonically_to_the_floor():
    f = [lr_factor(s, 50, 5, "cosine", min_ratio=0.0) for s in range(5, 51)]
    assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(f, f[1:]))


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(UserError, match="wsd, cosine or constant"):
        lr_factor(50, 100, 0, "linear")


def test_curriculum_stages():
    stages = parse_curriculum("16:3, 32:6", 64)
    assert stages == [(16, 3), (32, 6)]
    assert [curriculum_seq_len(s, stages, 64) for s in range(8)] == [16, 16, 16, 32, 32, 32, 64, 64]
    assert parse_curriculum("", 64) == []


@pytest.mark.parametrize("spec,match", [("24:10", "divide"), ("16:10,32:5", "increase"), ("16-10", "SEQ:UNTIL")])
def test_bad_curriculum_is_a_user_error(spec, match):
    with pytest.raises(UserError, match=match):
        parse_curriculum(spec, 64)

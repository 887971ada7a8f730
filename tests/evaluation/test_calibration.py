import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import log_loss

from fewshot_med.evaluation.calibration import TemperatureScaling, fit_episode_temperatures
from fewshot_med.methods.base import NotFittedError


def _nll(logits, labels, temperature):
    """Mean NLL of softmax(logits / T), written independently of the module under test."""
    logp = log_softmax(logits / temperature, axis=-1)
    return -np.mean(np.take_along_axis(logp, labels[..., None], axis=-1))


def _sample(temperature, n=20000, n_classes=5, scale=3.0, seed=0, batch=()):
    """Logits z and labels drawn from softmax(z / temperature): the true temperature is known."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(*batch, n, n_classes))
    logp = log_softmax(logits / temperature, axis=-1)
    cumulative = np.cumsum(np.exp(logp), axis=-1)
    u = rng.random((*batch, n, 1))
    labels = np.minimum((u > cumulative).sum(axis=-1), n_classes - 1).astype(np.int64)
    return logits, labels


def _separable(n=30, n_classes=4, seed=1, wrong=False):
    """Every sample's true class has the highest logit (or, with ``wrong``, the lowest)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, n_classes))
    labels = (logits.argmin(axis=1) if wrong else logits.argmax(axis=1)).astype(np.int64)
    return logits, labels


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_recovers_the_generating_temperature(t_true):
    logits, labels = _sample(t_true)
    ts = TemperatureScaling().fit(logits, labels)
    assert ts.temperature_ == pytest.approx(t_true, rel=0.05)
    assert ts.converged_ and not ts.at_bound_
    assert 1 <= ts.n_iter_ < 20


@pytest.mark.parametrize(
    ("t_true", "t_min", "t_max"), [(0.7, 0.05, 20.0), (3.0, 0.05, 20.0), (1.5, 0.5, 4.0)]
)
def test_matches_scalar_minimisation_of_the_nll(t_true, t_min, t_max):
    logits, labels = _sample(t_true, n=400, n_classes=3, seed=2)
    ts = TemperatureScaling(t_min=t_min, t_max=t_max).fit(logits, labels)
    ref = minimize_scalar(
        lambda t: _nll(logits, labels, t), bounds=(t_min, t_max), method="bounded", options={"xatol": 1e-9}
    )
    assert ts.temperature_ == pytest.approx(ref.x, rel=1e-5)
    assert ts.nll_after_ == pytest.approx(_nll(logits, labels, ts.temperature_), rel=1e-12)
    assert ts.nll_after_ <= ref.fun + 1e-12
    grid = np.linspace(t_min, t_max, 2001)
    assert ts.nll_after_ <= min(_nll(logits, labels, t) for t in grid) + 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nll_does_not_increase_and_matches_log_loss(seed):
    logits, labels = _sample(1.0 + seed, n=300, n_classes=4, seed=seed, scale=5.0 / (1 + seed))
    logits = logits * (0.3 + seed)  # miscalibrate
    ts = TemperatureScaling().fit(logits, labels)
    assert ts.nll_after_ <= ts.nll_before_
    probs = np.exp(log_softmax(logits, axis=-1))
    assert ts.nll_before_ == pytest.approx(log_loss(labels, probs, labels=range(4)), rel=1e-10)


@pytest.mark.parametrize("batch", [(), (6,)])
def test_transform_keeps_shape_and_argmax(batch):
    logits, labels = _sample(2.0, n=50, n_classes=3, seed=3, batch=batch)
    ts = TemperatureScaling().fit(logits, labels)
    out = ts.transform(logits)
    assert out.shape == logits.shape and out.dtype == np.float64
    np.testing.assert_allclose(out, logits / ts.temperature_)
    np.testing.assert_array_equal(out.argmax(axis=-1), logits.argmax(axis=-1))
    probs = ts.predict_proba(logits)
    assert probs.shape == logits.shape
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0)
    np.testing.assert_allclose(np.log(probs), log_softmax(out, axis=-1), atol=1e-12)


def test_three_d_fit_pools_all_episodes():
    logits, labels = _sample(1.7, n=40, n_classes=3, seed=4, batch=(5,))
    pooled = TemperatureScaling().fit(logits, labels)
    flat = TemperatureScaling().fit(logits.reshape(-1, 3), labels.reshape(-1))
    assert pooled.temperature_ == flat.temperature_


@pytest.mark.parametrize(("wrong", "bound"), [(False, "t_min"), (True, "t_max")])
@pytest.mark.parametrize(("t_min", "t_max"), [(0.05, 20.0), (0.2, 5.0)])
def test_separable_data_hits_a_bound(wrong, bound, t_min, t_max):
    logits, labels = _separable(wrong=wrong)
    ts = TemperatureScaling(t_min=t_min, t_max=t_max).fit(logits, labels)
    assert ts.temperature_ == {"t_min": t_min, "t_max": t_max}[bound]
    assert ts.at_bound_ and ts.converged_ and ts.n_iter_ == 0
    assert ts.nll_after_ <= ts.nll_before_


def test_constant_logits_keep_unit_temperature():
    logits = np.full((10, 3), 2.0)
    ts = TemperatureScaling().fit(logits, np.arange(10) % 3)
    assert ts.temperature_ == 1.0 and ts.converged_ and not ts.at_bound_


def test_temperature_scales_with_the_logits():
    logits, labels = _sample(1.3, n=500, n_classes=4, seed=5)
    t1 = TemperatureScaling().fit(logits, labels).temperature_
    t3 = TemperatureScaling().fit(3.0 * logits, labels).temperature_
    assert t3 == pytest.approx(3.0 * t1, rel=1e-7)


def test_per_episode_temperatures_equal_separate_fits():
    logits, labels = _sample(1.0, n=15, n_classes=3, seed=6, batch=(8,))
    logits = logits * np.linspace(0.2, 4.0, 8)[:, None, None]  # a different temperature per episode
    sep_logits, sep_labels = _separable(n=15, n_classes=3, seed=7)
    logits[2], labels[2] = sep_logits, sep_labels  # all correct: t_min
    logits[5], labels[5] = _separable(n=15, n_classes=3, seed=8, wrong=True)  # all wrong: t_max
    temps = fit_episode_temperatures(logits, labels, t_min=0.1, t_max=10.0)
    assert temps.shape == (8,) and temps.dtype == np.float64
    alone = [
        TemperatureScaling(t_min=0.1, t_max=10.0).fit(z, y).temperature_
        for z, y in zip(logits, labels, strict=True)
    ]
    np.testing.assert_allclose(temps, alone, rtol=1e-10)
    assert temps[2] == 0.1 and temps[5] == 10.0
    assert len(np.unique(temps)) == 8


def test_not_converging_warns():
    logits, labels = _sample(3.0, n=200, n_classes=3, seed=9)
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        ts = TemperatureScaling(max_iter=1).fit(logits, labels)
    assert not ts.converged_ and ts.n_iter_ == 1
    with pytest.warns(ConvergenceWarning, match="1 of 2"):
        fit_episode_temperatures(
            np.stack([logits, _separable(n=200, n_classes=3)[0]]),
            np.stack([labels, _separable(n=200, n_classes=3)[1]]),
            max_iter=1,
        )


_LOGITS = np.zeros((4, 3))
_LABELS = np.array([0, 1, 2, 0])


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (_LOGITS, _LABELS[:3], r"labels must have shape \(4,\)"),
        (_LOGITS, _LABELS[None], r"labels must have shape \(4,\)"),
        (_LOGITS, np.array([0, 1, 3, 0]), r"labels must lie in 0 … 2"),
        (_LOGITS, np.array([0, -1, 2, 0]), r"labels must lie in 0 … 2"),
        (_LOGITS, _LABELS.astype(float), "labels must be integers"),
        (np.zeros(4), _LABELS, r"logits must be \(n, C\) or \(E, n, C\)"),
        (np.zeros((1, 1, 4, 3)), _LABELS[None, None], r"logits must be \(n, C\) or \(E, n, C\)"),
        (np.zeros((4, 1)), np.zeros(4, dtype=int), "at least 2 classes"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "non-empty"),
        (np.where(np.eye(4, 3) > 0, np.nan, 0.0), _LABELS, "finite"),
    ],
)
def test_invalid_inputs_raise_value_error(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        TemperatureScaling().fit(logits, labels)


def test_per_episode_needs_three_d_logits():
    with pytest.raises(ValueError, match=r"logits must be \(E, n, C\), got shape \(4, 3\)"):
        fit_episode_temperatures(_LOGITS, _LABELS)
    with pytest.raises(ValueError, match=r"labels must have shape \(1, 4\)"):
        fit_episode_temperatures(_LOGITS[None], _LABELS)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"t_min": 0.0}, "t_min must be a positive finite number"),
        ({"t_max": np.inf}, "t_max must be a positive finite number"),
        ({"t_min": 2.0, "t_max": 1.0}, "t_min must be smaller than t_max"),
        ({"tol": -1.0}, "tol must be a positive finite number"),
        ({"max_iter": 0}, "max_iter must be a positive integer"),
        ({"max_iter": 2.5}, "max_iter must be a positive integer"),
    ],
)
def test_invalid_params_raise_value_error(params, match):
    with pytest.raises(ValueError, match=match):
        TemperatureScaling(**params).fit(_LOGITS, _LABELS)
    with pytest.raises(ValueError, match=match):
        fit_episode_temperatures(_LOGITS[None], _LABELS[None], **params)


def test_calibrator_contract():
    calibrator = TemperatureScaling()
    params = calibrator.get_params()
    assert clone(calibrator).get_params() == params
    for call in (calibrator.transform, calibrator.predict_proba):
        with pytest.raises(NotFittedError, match="not fitted"):
            call(_LOGITS)
    with pytest.raises(NotFittedError):
        calibrator.fitted_params()
    assert not [k for k in vars(calibrator) if k.endswith("_")]  # __init__ learns nothing
    logits, labels = _sample(1.5, n=60, n_classes=3, seed=10)
    assert calibrator.fit(logits, labels) is calibrator
    assert calibrator.get_params() == params  # fit does not touch the parameters
    logged = calibrator.fitted_params()
    assert all(isinstance(v, float) for v in logged.values())
    assert calibrator.transform(logits).shape == logits.shape


def test_temperature_scaling_params_and_logged_values():
    ts = TemperatureScaling(t_min=0.1, max_iter=50)
    assert ts.get_params() == {"t_min": 0.1, "t_max": 20.0, "tol": 1e-10, "max_iter": 50}
    logits, labels = _sample(0.8, n=100, n_classes=3, seed=11)
    ts.fit(logits, labels)
    assert ts.fitted_params() == {
        "temperature": ts.temperature_,
        "nll_before": ts.nll_before_,
        "nll_after": ts.nll_after_,
        "n_iter": float(ts.n_iter_),
    }
    assert issubclass(NotFittedError, ValueError)

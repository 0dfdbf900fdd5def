"""Explanation quality evaluation: the explain function, metric settings, evaluate() and search()."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("quantus")

from fxcanon import xai  # noqa: E402
from fxcanon.datasets import generate, shapes, sort_of_clevr  # noqa: E402
from fxcanon.equivalence import randomize_batchnorms  # noqa: E402
from fxcanon.evaluate import evaluate, explain_fn, prepare  # noqa: E402
from fxcanon.metrics import flip_step  # noqa: E402
from fxcanon.models.small import small_resnet, small_vgg  # noqa: E402
from fxcanon.search import layer_groups, search  # noqa: E402
from fxcanon.train import build_small  # noqa: E402

WEIGHTS = Path(__file__).parent / "assets" / "vgg_shapes.pt"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small batches: one thread is several times faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_vgg():
    torch.manual_seed(0)
    model = randomize_batchnorms(small_vgg(4), 0).eval()
    return prepare(model, (torch.randn(2, 3, 64, 64),))


@pytest.fixture(scope="session")
def trained():
    """The shipped small VGG trained on the shapes task by ``fxcanon.train`` (99.4% held-out accuracy)."""
    model = small_vgg(4)
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    data = shapes(16, seed=20_000)
    return prepare(model.eval(), (data.x[:2],)), data


@pytest.mark.parametrize("build", [small_vgg, small_resnet])
def test_lrp0_on_canonized_model_is_gradient_times_input(build):
    torch.manual_seed(1)
    model = randomize_batchnorms(build(4), 1).eval().double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 2, 3])
    canonized = prepare(model, (x.detach(),))[True]
    lrp0 = xai.lrp_composite("epsilon", epsilon=0.0, stabilizer=1e-300)  # 0/0 -> 0 at empty pools
    relevance = explain_fn(canonized, x.detach(), target, composite=lrp0, init="logit")
    (grad,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
    expected = (grad * x).sum(1, keepdim=True).detach().numpy()
    assert np.abs(relevance - expected).max() <= 1e-9 * max(1.0, np.abs(expected).max())


def test_explain_fn_contract(random_vgg, monkeypatch):
    def no_canonization(*args, **kwargs):
        raise AssertionError("explain_fn canonized")

    monkeypatch.setattr(xai, "canonicalize", no_canonization)
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    for pooling in ("sum", "max_norm", "pos_sq_sum"):
        a = explain_fn(random_vgg[True], x, np.array([0, 1, 2]), composite="eb", pooling=pooling)
        assert isinstance(a, np.ndarray) and a.shape == (3, 1, 64, 64) and np.isfinite(a).all()
        if pooling != "sum":
            assert (a >= 0).all()


def test_onehot_and_logit_seeds_are_rescalings(random_vgg):
    model = random_vgg[True]
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([0, 1, 2, 3])
    onehot = explain_fn(model, x, y, composite="epsilon_plus")
    logit = explain_fn(model, x, y, composite="epsilon_plus", init="logit")
    scale = model(x).gather(1, y[:, None]).detach().numpy().reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(logit, scale * onehot, rtol=1e-4, atol=1e-6 * np.abs(logit).max())


def test_scores_do_not_depend_on_batch_size_or_companions(random_vgg):
    data = shapes(6, seed=3)
    alone = evaluate(random_vgg, data[[4, 1]], ["eb"], "fast", batch_size=1, progress=False)
    together = evaluate(random_vgg, data, ["eb"], "fast", batch_size=6, progress=False)
    rows = {(r["canonized"], r["image"]): r for r in together.records}
    for r in alone.records:
        other = rows[r["canonized"], [4, 1][r["image"]]]
        for column in ("sparseness", "faithfulness_correlation", "aopc", "rra", "random_logit", "avg_sensitivity"):
            assert r[column] == pytest.approx(other[column], abs=1e-5), column


def test_masks_are_optional(random_vgg):
    data = shapes(2, seed=4)
    data.mask = None
    results = evaluate(random_vgg, (data.x, data.y), ["eb"], "fast", progress=False)
    assert all(np.isnan(r["rra"]) and np.isfinite(r["sparseness"]) for r in results.records)
    table = results.table()
    assert "RRA" not in table and "Sparseness" in table and table.count("\n") == 2


def test_pixel_flipping_step_divides_the_image():
    assert flip_step(64 * 64, 448 / 224 ** 2) == 32
    assert flip_step(224 * 224, 448 / 224 ** 2) == 448


def test_auto_groups_split_convolutions_into_thirds(random_vgg):
    for model in random_vgg.values():
        groups = layer_groups(model)
        assert {k: len(v) for k, v in groups.items()} == {"conv1": 2, "conv2": 1, "conv3": 1, "classifier": 2}


def test_named_groups_and_epsilon_rule(random_vgg):
    groups = {"features": ["0"], "classifier": ["3", "5"]}
    result = search(random_vgg, shapes(2, seed=6), groups, {"features": (0.0, 0.5), "classifier": (1e-6,)},
                    rules={"classifier": "epsilon"}, columns=("sparseness",), progress=False)
    assert result.meta["modules_per_group"] == {"features": 4, "classifier": 2}
    assert result.configurations == [{"features": 0.0, "classifier": 1e-6}, {"features": 0.5, "classifier": 1e-6}]
    assert result.best("sparseness", canonized=True)[0] in result.configurations


def test_canonization_on_a_trained_model(trained):
    """What the paper reports and this data reproduces: canonized explanations are sparser and less
    sensitive to noise for EB and LRP-eps+ (means over 16 images)."""
    models, data = trained
    results = evaluate(models, data, ["eb", "epsilon_plus"], "fast",
                       columns=("sparseness", "avg_sensitivity"), progress=False)
    means = results.means()
    for name in ("eb", "epsilon_plus"):
        assert means[name, True]["sparseness"] > means[name, False]["sparseness"], name
        assert means[name, True]["avg_sensitivity"] < means[name, False]["avg_sensitivity"], name


def test_gamma_grid_localizes_better_canonized(trained):
    models, data = trained
    result = search(models, data[:8], grid=(0.0, 1.0), columns=("rra",), progress=False)
    assert len(result.configurations) == 2 ** 4
    assert result.median("rra", canonized=True) >= result.median("rra", canonized=False)


def test_relation_network_end_to_end():
    data = sort_of_clevr(3, seed=5)
    model = randomize_batchnorms(build_small("rn", data), 0).eval()
    results = evaluate(model, data, ["eb", "rn_custom"], "fast", pooling="pos_sq_sum", progress=False)
    assert len(results.records) == 2 * 2 * 3
    assert all(np.isfinite(r["rra"]) and np.isfinite(r["avg_sensitivity"]) for r in results.records)


@pytest.mark.slow
def test_cli_writes_tables_and_figures(tmp_path):
    from fxcanon.cli import main

    common = ["--weights", str(WEIGHTS), "--images", "2", "--out", str(tmp_path)]
    assert main(["evaluate", "vgg", "--data", "shapes", "--preset", "fast", *common]) == 0
    assert main(["search", "vgg", "--data", "shapes", "--gamma", "0", *common]) == 0
    for name in ("table.md", "scores.csv", "scores.json", "pixel_flipping.png", "search.md", "search.csv",
                 "search.json", "search_curves.png", "search_heatmaps.png"):
        assert (tmp_path / f"vgg_{name}").stat().st_size > 0, name
    assert "**" in (tmp_path / "vgg_table.md").read_text()


def test_generated_data_is_deterministic():
    a, b = generate("shapes", 3, seed=7), generate("shapes", 3, seed=7)
    assert torch.equal(a.x, b.x) and torch.equal(a.mask, b.mask) and not torch.equal(a.x, generate("shapes", 3, 8).x)
    clevr = sort_of_clevr(4, seed=1)
    assert clevr.extra[0].shape == (4, 2) and clevr.mask.any(dim=(1, 2, 3)).all()

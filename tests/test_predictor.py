"""The schedule predictor: encoding, padding invariance, ranking loss, learning a synthetic FID, checkpoints."""
import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from scipy import stats

from oms_lightning.diffusion.noise_schedule import VPSchedule
from oms_lightning.diffusion.solvers import SOLVER_REGISTRY
from oms_lightning.errors import UserError
from oms_lightning.predictor.encoding import LAMBDA_SCALE, EncodedSchedules, ScheduleEncoder
from oms_lightning.predictor.module import (PredictorModule, ScheduleFIDDataModule, fit_predictor,
                                            pairwise_hinge_loss, rank_metrics, rank_metrics_near,
                                            standardised_mse_loss)
from oms_lightning.schedule import ModelSchedule
from oms_lightning.schedule.file import schedule_from_dict, schedule_to_dict
from oms_lightning.search.space import SlotSpace, random_schedules

MEMBERS = ["a", "b", "c"]
NOISE = VPSchedule()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path, **kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=tmp_path, num_sanity_val_steps=0)
    args.update(kw)
    return L.Trainer(**args)


HIDDEN_QUALITY = {"a": 0.0, "b": 0.4, "c": 1.0}  # "a" is the best member, "c" the worst


def synthetic_fid(schedule: ModelSchedule) -> float:
    """Known ground truth: each NFE costs quality[member] · sigmoid(λ at the step's middle time), which weighs the
    clean end more (small members are fine at the noisy end), plus 20 / NFE (more NFEs help)."""
    total = 0.0
    for step in schedule.steps:
        lam = float(NOISE.lambda_(torch.tensor(0.5 * (step.t_start + step.t_end), dtype=torch.float64)))
        weight = 1.0 / (1.0 + math.exp(-lam))
        total += sum(HIDDEN_QUALITY[m] for m in step.members) * weight
    return total + 20.0 / schedule.nfe


def _records(n: int, seed: int, max_steps: int = 8) -> list[dict]:
    space = SlotSpace(tuple(MEMBERS), max_steps, NOISE)
    return [{"schedule": schedule_to_dict(s), "fid": synthetic_fid(s)}
            for s in random_schedules(space, n, seed, null_prob=0.6)]


# ------------------------------------------------------------------------------------------------ encoding
def test_encoding_of_a_hand_made_schedule():
    times = [1.0, 0.5, 0.1, 0.001]
    s = ModelSchedule.from_times_and_members(times, [["a", "b"], "c", ["a", "a", "c"]])
    enc = ScheduleEncoder(MEMBERS, NOISE, max_steps=5).encode([s])
    assert len(enc) == 1 and enc.num_steps == 5
    assert enc.member_ids.dtype == torch.long and enc.member_ids.shape == (1, 5, 3)
    assert enc.member_ids[0].tolist() == [[1, 2, 0], [3, 0, 0], [1, 1, 3], [0, 0, 0], [0, 0, 0]]
    assert enc.orders.tolist() == [[2, 1, 3, 0, 0]]
    assert enc.mask.tolist() == [[True, True, True, False, False]]
    assert enc.lambdas.dtype == torch.float32 and enc.lambdas.shape == (1, 5, 2)
    lam = NOISE.lambda_(torch.tensor(times, dtype=torch.float64)) / LAMBDA_SCALE
    expected = torch.stack([lam[:-1], lam[1:]], dim=-1).float()
    torch.testing.assert_close(enc.lambdas[0, :3], expected)
    assert enc.lambdas[0, 3:].abs().sum() == 0
    assert -0.6 < float(enc.lambdas.min()) and float(enc.lambdas.max()) < 0.7  # roughly unit range
    solvers = sorted(SOLVER_REGISTRY)
    assert enc.solver_ids.tolist() == [solvers.index("dpm_solver")]

    heun = ModelSchedule.from_times_and_members([1.0, 0.3, 0.01], [["c", "a"], ["b", "b"]], solver="heun")
    ddim = ModelSchedule.single("b", [1.0, 0.5, 0.2, 0.01], solver="ddim")
    both = ScheduleEncoder(MEMBERS, NOISE.to_dict(), 5).encode([heun, ddim])
    assert both.member_ids[0, :2].tolist() == [[3, 1, 0], [2, 2, 0]]
    assert both.orders.tolist() == [[2, 2, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert both.solver_ids.tolist() == [solvers.index("heun"), solvers.index("ddim")]

    # indexing keeps the batch dimension; pad_to pads and trims padding only
    assert both[1].orders.tolist() == [[1, 1, 1, 0, 0]] and len(both[0:2]) == 2 and len(both[[1]]) == 1
    assert both.pad_to(7).num_steps == 7 and both.pad_to(3).orders.tolist() == [[2, 2, 0], [1, 1, 1]]
    with pytest.raises(UserError, match="3 steps"):
        both.pad_to(2)
    assert both.to("cpu").device.type == "cpu"


def test_encoding_errors():
    s = ModelSchedule.from_times_and_members([1.0, 0.5, 0.01], ["a", ["b", "zeta"]])
    with pytest.raises(UserError, match="'zeta'"):
        ScheduleEncoder(MEMBERS, NOISE, 4).encode([s])
    long = ModelSchedule.single("a", np.linspace(1.0, 0.01, 7).tolist())
    with pytest.raises(UserError, match="max_steps=5"):
        ScheduleEncoder(MEMBERS, NOISE, 5).encode([long])
    for bad in (["b", "a"], ["a", "a", "b"], []):
        with pytest.raises(UserError, match="members"):
            ScheduleEncoder(bad, NOISE, 4)
    with pytest.raises(UserError, match="loss"):
        PredictorModule(MEMBERS, NOISE.to_dict(), 4, loss="l1")
    with pytest.raises(UserError, match="fid"):
        ScheduleFIDDataModule([{"schedule": schedule_to_dict(long), "fid": float("nan")}] * 2,
                              ScheduleEncoder(MEMBERS, NOISE, 8))


# ------------------------------------------------------------------------------------------------ network
def test_padding_invariance():
    torch.manual_seed(0)
    module = PredictorModule(MEMBERS, NOISE.to_dict(), max_steps=20).eval()
    assert 200_000 < module.num_parameters() < 300_000
    short = random_schedules(SlotSpace(tuple(MEMBERS), 10, NOISE), 32, seed=1, null_prob=0.5)
    long = [s for s in random_schedules(SlotSpace(tuple(MEMBERS), 20, NOISE), 64, seed=2, null_prob=0.1)
            if len(s.steps) > 10][:16]
    assert long and max(len(s.steps) for s in short) <= 10
    with torch.no_grad():
        at10 = module(ScheduleEncoder(MEMBERS, NOISE, 10).encode(short))
        at20 = module(module.encoder.encode(short))
        mixed = module(EncodedSchedules.cat([ScheduleEncoder(MEMBERS, NOISE, 10).encode(short),
                                             module.encoder.encode(long)]))
        alone = module(ScheduleEncoder(MEMBERS, NOISE, 10).encode(short[:1]))
    torch.testing.assert_close(at10, at20, atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[: len(short)], at10, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone, at10[:1], atol=1e-6, rtol=0)
    # predict_scores: deterministic, one per schedule, independent of its batch size; mode restored
    module.train()
    scores = module.predict_scores(short + long, batch_size=7)
    assert scores.shape == (len(short) + len(long),) and module.training
    np.testing.assert_array_equal(scores, module.predict_scores(short + long, batch_size=7))
    np.testing.assert_allclose(scores, module.predict_scores(short + long), atol=1e-6, rtol=0)
    np.testing.assert_allclose(scores[: len(short)], at10.double().numpy(), atol=1e-6, rtol=0)


def test_iia_coefficients_are_encoded_in_their_features_columns_and_change_the_score():
    from conftest import corrected_schedule

    plain, corrected = corrected_schedule()
    plain3 = ModelSchedule.from_times_and_members(plain.times, ["a", "b", "a"], solver="dpm_solver++")
    full = plain3.with_correction("full", [[0.5, 0.0, 0.0], [0.1, -0.2, 0.3], [0.0, 0.4, -0.6]], weights="w")
    enc = ScheduleEncoder(["a", "b"], NOISE, max_steps=5)
    assert enc.features == ("corrector", "eps", "eps_diff", "euler", "x0_diff")
    batch = enc.encode([plain, corrected, full])
    assert batch.coefficients.shape == (3, 5, 5)
    assert not batch.coefficients[0].any()                         # plain: no coefficients
    torch.testing.assert_close(batch.coefficients[1, :3, 1], torch.tensor([0.1, 0.0, -0.2]))
    assert not batch.coefficients[1][:, [0, 2, 3, 4]].any() and not batch.coefficients[1, 3:].any()
    torch.testing.assert_close(batch.coefficients[2, :3][:, [1, 2, 4]],
                               torch.tensor([[0.5, 0.0, 0.0], [0.1, -0.2, 0.3], [0.0, 0.4, -0.6]]))
    # padding and concatenation keep them in place
    torch.testing.assert_close(EncodedSchedules.cat([batch[:1], batch[1:].pad_to(7)]).coefficients[:, :5],
                               batch.coefficients)
    # the predictor tells a corrected schedule from its plain version; the plain one's score ignores the map
    torch.manual_seed(0)
    module = PredictorModule(["a", "b"], NOISE.to_dict(), max_steps=5).eval()
    with torch.no_grad():
        before = module(batch)
        module.net.coefficient_proj.weight.mul_(3.0)
        after = module(batch)
    assert before[0] == after[0] and before[1] != after[1] and before[1] != before[0]
    with pytest.raises(UserError, match="feature set 'full'.*eps_diff"):
        ScheduleEncoder(["a", "b"], NOISE, max_steps=5, features=["eps"]).encode(full)


def test_plain_schedules_score_as_before_coefficients_were_encoded():
    from oms_lightning.predictor.network import SchedulePredictor

    schedules = random_schedules(SlotSpace(tuple(MEMBERS), 6, NOISE), 16, seed=3, null_prob=0.5)
    batch = ScheduleEncoder(MEMBERS, NOISE, 6).encode(schedules)
    torch.manual_seed(0)
    without = SchedulePredictor(len(MEMBERS), num_features=0).eval()
    torch.manual_seed(0)
    with_columns = SchedulePredictor(len(MEMBERS), num_features=len(batch.coefficients[0, 0])).eval()
    with torch.no_grad():
        assert torch.equal(without(batch), with_columns(batch))


# ------------------------------------------------------------------------------------------------ loss
def test_pairwise_hinge_loss_by_hand():
    scores = torch.tensor([0.0, 0.5, 3.0], requires_grad=True)
    fids = torch.tensor([1.0, 2.0, 2.1])
    # threshold 0.25: pairs (0,1) → relu(1 − 0.5) = 0.5 and (0,2) → relu(1 − 3) = 0; (1,2) is within the threshold
    loss = pairwise_hinge_loss(scores, fids, margin=1.0, threshold=0.25)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert scores.grad.tolist() == pytest.approx([0.5, -0.5, 0.0])
    # threshold 0: (1,2) counts too → relu(1 − 2.5) = 0; mean over 3 pairs
    assert pairwise_hinge_loss(scores, fids, 1.0, 0.0).item() == pytest.approx(0.5 / 3)
    # every pair within the threshold → zero loss, still differentiable
    none = pairwise_hinge_loss(scores, fids, 1.0, 5.0)
    assert none.item() == 0.0 and none.requires_grad
    # MSE to batch-standardised FIDs: zero for a perfect standardised prediction
    target = (fids - fids.mean()) / fids.std(unbiased=False)
    assert standardised_mse_loss(target, fids).item() == pytest.approx(0.0, abs=1e-10)
    assert rank_metrics(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0]))["kendall_tau"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ training
def test_module_trains_in_a_trainer_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    records = _records(120, seed=3)
    # both record forms are accepted
    records = records[:60] + [(schedule_from_dict(r["schedule"]), r["fid"]) for r in records[60:]]
    module = PredictorModule(MEMBERS, NOISE.to_dict(), 8, fid_threshold=0.05)
    dm = ScheduleFIDDataModule(records, module.encoder, val_fraction=0.5, split_seed=0, batch_size=32)
    assert len(dm.train_indices) == 60 and len(dm.val_indices) == 60
    assert not set(dm.train_indices) & set(dm.val_indices)
    dm2 = ScheduleFIDDataModule(records, module.encoder, split_seed=0)
    np.testing.assert_array_equal(dm.val_indices, dm2.val_indices)
    enc, fids = next(iter(dm.train_dataloader()))
    assert isinstance(enc, EncodedSchedules) and len(enc) == 32 and fids.shape == (32,)

    trainer = _trainer(tmp_path, max_epochs=3)
    trainer.fit(module, datamodule=dm)
    for key in ("val/kendall_tau", "val/spearman", "val/loss", "train/loss"):
        assert key in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics[key])

    path = tmp_path / "predictor.ckpt"
    trainer.save_checkpoint(path)
    loaded = PredictorModule.load_from_checkpoint(path, weights_only=True, map_location="cpu")
    assert loaded.hparams.members == MEMBERS and loaded.hparams.fid_threshold == 0.05
    schedules = dm.schedules[:50]
    np.testing.assert_array_equal(module.predict_scores(schedules), loaded.predict_scores(schedules))


@pytest.mark.slow
def test_learns_a_synthetic_fid(tmp_path):
    records = _records(600, seed=0)
    module, metrics = fit_predictor(
        records, MEMBERS, NOISE, 8,
        trainer_kwargs={"max_epochs": 60, "accelerator": "cpu", "devices": 1, "check_val_every_n_epoch": 5,
                        "default_root_dir": tmp_path},
        batch_size=64, fid_threshold=0.0, seed=0)
    assert metrics["n_train"] == 300 and metrics["n_val"] == 300
    assert metrics["kendall_tau"] >= 0.9, metrics
    assert metrics["best_model_path"] and not module.training
    # the returned module is the best checkpoint's weights
    best = PredictorModule.load_from_checkpoint(metrics["best_model_path"], weights_only=True, map_location="cpu")
    schedules = [schedule_from_dict(r["schedule"]) for r in records[:20]]
    np.testing.assert_array_equal(best.predict_scores(schedules), module.predict_scores(schedules))


# ------------------------------------------------------------------------------------------------ splits
LATENCY = {"a": 3.0, "b": 2.0, "c": 1.0}


def test_three_way_split_is_disjoint_complete_and_fixed_by_the_seed():
    records = _records(50, seed=4)
    encoder = ScheduleEncoder(MEMBERS, NOISE, 8)

    def split(seed, test_fraction=0.2):
        dm = ScheduleFIDDataModule(records, encoder, val_fraction=0.3, split_seed=seed, test_fraction=test_fraction)
        return dm.train_indices, dm.val_indices, dm.test_indices

    train, val, test = split(0)
    assert (len(train), len(val), len(test)) == (25, 15, 10)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert sorted([*train, *val, *test]) == list(range(50))
    for a, b in zip(split(0), (train, val, test)):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(split(1), (train, val, test)))
    # a test split is carved from the training part: the validation split is the same as without one
    no_test = split(0, test_fraction=0.0)
    np.testing.assert_array_equal(no_test[1], val)
    assert len(no_test[2]) == 0 and sorted([*no_test[0], *no_test[1]]) == list(range(50))
    dm = ScheduleFIDDataModule(records, encoder, val_fraction=0.3, test_fraction=0.2)
    assert len(dm.test_dataset) == 10 and ScheduleFIDDataModule(records, encoder).test_dataset is None


@pytest.mark.parametrize("val_fraction, test_fraction, match", [
    (1.0, 0.0, "val_fraction"), (-0.1, 0.0, "val_fraction"), (float("nan"), 0.0, "val_fraction"),
    (0.5, 1.0, "test_fraction"), (0.5, -0.2, "test_fraction"), (0.5, "0.1", "test_fraction"),
    (0.6, 0.4, "must be < 1"), (0.5, 0.4, "leave 0 to train"),
])
def test_split_fraction_errors(val_fraction, test_fraction, match):
    with pytest.raises(UserError, match=match):
        ScheduleFIDDataModule(_records(4, seed=5), ScheduleEncoder(MEMBERS, NOISE, 8), val_fraction=val_fraction,
                              test_fraction=test_fraction)


def test_rank_metrics_near_filters_by_cost():
    scores = [1.0, 2.0, 3.0, 4.0, 5.0]
    fids = [10.0, 30.0, 20.0, 25.0, 50.0]
    costs = [1.0, 0.95, 1.05, 2.0, None]
    # within 1 ± 0.1: records 0, 1, 2; pairs (0,1), (0,2) concordant, (1,2) discordant → τ = 1/3; ρ = 1 − 6·2/24
    near = rank_metrics_near(scores, fids, costs, budget=1.0, tolerance=0.1)
    assert near == pytest.approx({"kendall_tau": 1 / 3, "spearman": 0.5, "n": 3})
    assert rank_metrics_near(scores, fids, costs, 1.0, tolerance=0.01)["n"] == 1
    alone = rank_metrics_near(scores, fids, costs, budget=2.0)
    assert alone["n"] == 1 and math.isnan(alone["kendall_tau"]) and math.isnan(alone["spearman"])
    assert rank_metrics_near(scores, fids, costs, budget=10.0)["n"] == 0  # a missing cost never matches
    for kw, match in (({"budget": 0.0}, "budget"), ({"budget": 1.0, "tolerance": -1.0}, "tolerance")):
        with pytest.raises(UserError, match=match):
            rank_metrics_near(scores, fids, costs, **kw)
    with pytest.raises(UserError, match="one entry per record"):
        rank_metrics_near(scores, fids[:4], costs, 1.0)


def _fit_small(records, tmp_path, **kw):
    return fit_predictor(records, MEMBERS, NOISE, 8,
                         trainer_kwargs={"max_epochs": 3, "accelerator": "cpu", "devices": 1,
                                         "default_root_dir": tmp_path},
                         batch_size=32, fid_threshold=0.0, seed=0, **kw)


def test_fit_predictor_reports_tau_on_the_test_split(tmp_path):
    records = _records(80, seed=6)
    for k, r in enumerate(records):
        s = schedule_from_dict(r["schedule"])
        r["cost"] = s.cost(LATENCY)
        if k % 2:
            r["nfe"] = s.nfe  # either from the record or computed from the schedule: the same
    module, metrics = _fit_small(records, tmp_path, val_fraction=0.4, test_fraction=0.3, split_seed=2)
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (24, 32, 24)
    dm = ScheduleFIDDataModule(records, module.encoder, val_fraction=0.4, split_seed=2, test_fraction=0.3)
    assert metrics["test_predictions"]["index"] == dm.test_indices.tolist()

    def tau(idx):
        scores = module.predict_scores([dm.schedules[i] for i in idx])
        return stats.kendalltau(scores, [records[i]["fid"] for i in idx]).statistic

    # the headline τ is the test split's; the selection split's is reported apart
    assert metrics["kendall_tau"] == pytest.approx(tau(dm.test_indices), abs=1e-12)
    assert metrics["test"]["kendall_tau"] == metrics["kendall_tau"] and metrics["test"]["n"] == 24
    assert metrics["kendall_tau_val"] == pytest.approx(tau(dm.val_indices), abs=1e-12)
    assert metrics["kendall_tau"] != metrics["kendall_tau_val"]
    # the checkpoint was selected on the validation split
    ckpt = torch.load(metrics["best_model_path"], map_location="cpu", weights_only=True)
    best_score = next(v["best_model_score"] for k, v in ckpt["callbacks"].items() if "ModelCheckpoint" in k)
    assert float(best_score) == pytest.approx(metrics["kendall_tau_val"], abs=1e-4)

    # the trivial "more compute is better" rankings on the same test records
    test = [records[i] for i in dm.test_indices]
    fids = [r["fid"] for r in test]
    nfe = [schedule_from_dict(r["schedule"]).nfe for r in test]
    assert metrics["test"]["kendall_tau_neg_nfe"] == pytest.approx(stats.kendalltau(-np.array(nfe), fids).statistic)
    assert metrics["test"]["kendall_tau_neg_cost"] == pytest.approx(
        stats.kendalltau(-np.array([r["cost"] for r in test]), fids).statistic)
    pred = metrics["test_predictions"]
    assert pred["nfe"] == nfe and pred["fid"] == fids and pred["cost"] == [r["cost"] for r in test]
    assert pred["score"] == pytest.approx(module.predict_scores([dm.schedules[i] for i in dm.test_indices]))
    near = rank_metrics_near(pred["score"], pred["fid"], pred["cost"], budget=float(np.median(pred["cost"])),
                             tolerance=0.5)
    assert 2 <= near["n"] <= 24
    json.dumps(metrics)  # the search pipeline writes the metrics as JSON


def test_fit_predictor_without_test_split_or_costs(tmp_path):
    records = [(schedule_from_dict(r["schedule"]), r["fid"]) for r in _records(40, seed=7)]
    _, metrics = _fit_small(records, tmp_path / "no_test")
    assert metrics["n_test"] == 0 and "test" not in metrics and "test_predictions" not in metrics
    assert metrics["kendall_tau"] == metrics["kendall_tau_val"]  # as before: the validation τ
    # pairs carry no cost: the cost baseline is None, the NFE one is computed from the schedules
    _, metrics = _fit_small(records, tmp_path / "test", test_fraction=0.25)
    assert metrics["n_test"] == 10 and metrics["test"]["kendall_tau_neg_cost"] is None
    assert math.isfinite(metrics["test"]["kendall_tau_neg_nfe"])
    assert metrics["test_predictions"]["cost"] == [None] * 10


def test_search_callback_runs_the_evolution_when_a_predictors_fit_ends(tmp_path):
    """The callback path (the pipeline calls `search` directly): attached to the Trainer, it searches with the
    best-τ weights restored, and its result is the one `search` gives on the returned (best) predictor."""
    from oms_lightning.search.callback import SearchCallback

    space = SlotSpace(tuple(MEMBERS), 8, NOISE)
    evolution = {"generations": 3, "population": 8, "children": 8}
    attached = SearchCallback([space], lambda s: s.cost(LATENCY), [6.0], seed=0, evolution=evolution)
    module, _ = fit_predictor(_records(60, seed=7), MEMBERS, NOISE, 8,
                              trainer_kwargs={"max_epochs": 3, "accelerator": "cpu", "callbacks": [attached],
                                              "default_root_dir": tmp_path}, batch_size=32, fid_threshold=0.0)
    (found,) = attached.results[6.0]
    assert found.best.schedule.cost(LATENCY) <= 6.0
    direct = SearchCallback([space], lambda s: s.cost(LATENCY), [6.0], seed=0, evolution=evolution).search(module)
    assert direct[6.0][0].best.score == pytest.approx(found.best.score)

"""``MultiDatasetDataModule``: several named EMT datasets through a real nequip module and a real
Lightning Trainer; splits and statistics side by side with nequip's own ``NequIPDataModule``;
exact mid-epoch restarts; bad configs refused at construction or setup."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from nequip.data import AtomicDataDict
from nequip.data.datamodule import NequIPDataModule
from nequip.train import NequIPLightningModule

from nequip_mtl.data import DATASET_INDEX_KEY, MultiDatasetDataModule
from nequip_mtl.data.multi_dataset import ResumableDataLoader
from nequip_mtl.data.sampling import MultiDatasetSampler
from nequip_mtl.train.callbacks import DatasetMetricNames
from tests._harness import (
    SPECS,
    STATS,
    emt,
    metrics_config,
    module_kwargs,
    multi,
    params,
    splits,
    trainer,
)


def single(name: str) -> NequIPDataModule:
    """nequip's own data module on one of the datasets alone, same seed and split."""
    return NequIPDataModule(
        seed=5,
        split_dataset=splits([name])[name]["split_dataset"],
        train_dataloader={"batch_size": 3},
        val_dataloader={"batch_size": 4},
        stats_manager=STATS,
    )


def energies(dataset) -> list[float]:
    return [float(dataset[i][AtomicDataDict.TOTAL_ENERGY_KEY]) for i in range(len(dataset))]


class BatchRecorder(Callback):
    """(dataset_index list, total_energy list) of every training batch, as the module saw it."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        idx = batch[DATASET_INDEX_KEY]
        assert idx.dtype == torch.long and idx.shape == (AtomicDataDict.num_frames(batch),)
        self.batches.append(
            (idx.tolist(), batch[AtomicDataDict.TOTAL_ENERGY_KEY].flatten().tolist())
        )


def module(dm) -> NequIPLightningModule:
    torch.manual_seed(0)
    return NequIPLightningModule(
        **module_kwargs(
            num_datasets=dm.num_datasets,
            optimizer={"_target_": "torch.optim.Adam", "lr": 0.01},
            test_metrics=metrics_config(),
        )
    )


# ----------------------------------------------------------------- frames, splits, statistics


def test_frames_carry_their_dataset_and_splits_match_nequip():
    names = ("a", "b", "c")
    dm = multi(names)
    dm.setup("fit")
    refs = {}
    for n in names:
        ref = single(n)
        ref.setup("fit")
        refs[n] = (energies(ref.train_dataset[0]), energies(ref.val_dataset[0]))
    loader = dm.train_dataloader()
    seen = {n: [] for n in names}
    for batch in loader:
        idx = batch[DATASET_INDEX_KEY]
        assert idx.dtype == torch.long and idx.shape == (AtomicDataDict.num_frames(batch),)
        for d, e in zip(idx.tolist(), batch[AtomicDataDict.TOTAL_ENERGY_KEY].flatten().tolist()):
            seen[names[d]].append(e)
    for n in names:  # proportional, 18 frames in 6 batches of 3: each training frame once
        assert sorted(seen[n]) == sorted(refs[n][0])
    assert dm.val_dataloader_names == list(names)
    for j, val in enumerate(dm.val_dataloader()):
        frames = [(int(d), float(e)) for b in val for d, e in
                  zip(b[DATASET_INDEX_KEY], b[AtomicDataDict.TOTAL_ENERGY_KEY].flatten())]  # fmt: skip
        assert {d for d, _ in frames} == {j}
        assert sorted(e for _, e in frames) == sorted(refs[names[j]][1])
    assert dm.num_datasets == {"train": 1, "val": 3, "test": 0, "predict": 0}


def test_frames_are_tagged_by_dataset_when_a_middle_dataset_has_no_val_split():
    """`b` has no validation or test split: the validation loaders are those of `a` and
    `c`, whose frames carry dataset_index 0 and 2 (their positions in `datasets`), not
    the loader positions 0 and 1; likewise `c`'s test frames carry 2.

    Fails if a split's frames are tagged by their loader position (``TaggedDataset(d, j)``
    instead of ``owners[j]``)."""
    datasets = {
        **splits(["a"]),
        "b": {"split_dataset": {"dataset": emt(22, 4), "train": 4}},
        "c": {"split_dataset": {"dataset": emt(33, 9), "train": 6, "val": 2, "test": 1}},
    }
    dm = MultiDatasetDataModule(
        seed=5,
        datasets=datasets,
        train_dataloader={"batch_size": 3},
        val_dataloader={"batch_size": 4},
        test_dataloader={"batch_size": 4},
        stats_manager=STATS,
    )
    assert dm.val_dataloader_names == ["a", "c"] and dm.test_dataloader_names == ["c"]

    def tags(loaders):
        return [{int(i) for b in loader for i in b[DATASET_INDEX_KEY]} for loader in loaders]

    dm.setup("fit")
    assert tags(dm.val_dataloader()) == [{0}, {2}]
    dm.setup("test")
    assert tags(dm.test_dataloader()) == [{2}]


@pytest.mark.parametrize("primary", [None, "b"])
def test_statistics_are_nequips_on_the_primary_dataset(primary):
    got = multi(("a", "b"), primary=primary).get_statistics(dataset="train")
    want = single(primary or "a").get_statistics(dataset="train")
    other = single("a" if primary else "b").get_statistics(dataset="train")
    assert got.keys() == want.keys()
    for k in want:
        g, w = (got[k], want[k]) if isinstance(want[k], dict) else ({0: got[k]}, {0: want[k]})
        assert g.keys() == w.keys(), k
        assert all(torch.allclose(torch.as_tensor(g[t]), torch.as_tensor(w[t])) for t in w), k
    assert got["per_atom_energy_mean"] != other["per_atom_energy_mean"]


# ----------------------------------------------------------------- training through Lightning


@pytest.mark.parametrize(
    "names,frames_per_batch", [(("a", "b"), [2, 1]), (("a", "b", "c"), [2, 1, 1])], ids=["2", "3"]
)
def test_a_real_epoch_has_balanced_batches(tmp_path, names, frames_per_batch):
    sampling = {"mode": "balanced", "frames_per_batch": dict(zip(names, frames_per_batch))}
    dm = multi(names, sampling=sampling, train_dataloader={})
    mod = module(dm)
    before = params(mod).clone()
    rec, named = BatchRecorder(), DatasetMetricNames()
    tr = trainer(tmp_path, max_epochs=1, callbacks=[rec, named])
    tr.fit(mod, datamodule=dm)
    # default epoch: every frame of every dataset at least once
    n_batches = max(-(-SPECS[n][1] // k) for n, k in zip(names, frames_per_batch))
    assert len(rec.batches) == tr.global_step == n_batches
    expected = [i for i, k in enumerate(frames_per_batch) for _ in range(k)]
    assert all(idx == expected for idx, _ in rec.batches)
    assert not torch.equal(params(mod), before)
    metrics = tr.callback_metrics
    for j, n in enumerate(names):  # named copies of each loader's metrics
        assert torch.equal(
            metrics[f"val_{n}_epoch/forces_mae"], metrics[f"val{j}_epoch/forces_mae"]
        )
    assert metrics["val0_epoch/forces_mae"] != metrics["val1_epoch/forces_mae"]


def test_a_run_interrupted_mid_epoch_sees_exactly_the_remaining_batches(tmp_path):
    sampling = {"mode": "balanced", "frames_per_batch": {"a": 2, "b": 1}}

    def fit(root, ckpt_path=None, **kw):
        dm = multi(("a", "b"), sampling=sampling, train_dataloader={})
        rec = BatchRecorder()
        ckpt = ModelCheckpoint(dirpath=str(root), save_last=True, every_n_train_steps=3)
        tr = trainer(root, callbacks=[rec, ckpt], enable_checkpointing=True, **kw)
        tr.fit(module(dm), datamodule=dm, ckpt_path=ckpt_path)
        return rec.batches, tr

    full, tr = fit(tmp_path / "full", max_epochs=2)
    assert len(full) == 2 * 4  # 4 batches an epoch (a: 8 frames / 2)
    first, _ = fit(tmp_path / "part", max_epochs=2, max_steps=3)  # stops in epoch 0
    rest, tr = fit(
        tmp_path / "resumed", max_epochs=2, ckpt_path=str(tmp_path / "part" / "last.ckpt")
    )
    assert len(first) == 3 and tr.global_step == 8
    assert first + rest == full


def test_a_second_restart_replays_no_batch():
    """The loader resumed at batch 1 counts on from there: after two more batches its state
    says 3 done, so a second restart sees exactly the last batch (Trainer-free: the
    module's own loader and sampler over a list of frame ids).

    Fails if a resumed loader counts its batches from 0 (``self._done = 0`` in
    ``ResumableDataLoader.__iter__``): the second restart replays batch 2."""

    def loader():
        sampler = MultiDatasetSampler([8, 4], mode="balanced", frames_per_batch=[2, 1], seed=3)
        return ResumableDataLoader(list(range(12)), sampler=sampler, batch_size=3, drop_last=True)

    full = [b.tolist() for b in loader()]
    assert len(full) == 4
    first = loader()
    it = iter(first)
    seen = [next(it).tolist()]
    second = loader()
    second.load_state_dict(first.state_dict())
    it = iter(second)
    seen += [next(it).tolist(), next(it).tolist()]
    state = second.state_dict()
    assert state["epoch"] == 0 and state["batches_done"] == 3
    third = loader()
    third.load_state_dict(state)
    seen += [b.tolist() for b in third]
    assert seen == full


# ----------------------------------------------------------------- bad input


def _bad(**kw):
    base = dict(seed=1, datasets=splits(("a", "b")), train_dataloader={"batch_size": 2})
    base.update(kw)
    return MultiDatasetDataModule(**base)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"datasets": {}}, r"`data.datasets` is empty"),
        ({"datasets": {"": splits(["a"])["a"]}}, r"dataset name '' in `data.datasets` is not"),
        ({"datasets": {"a/b": splits(["a"])["a"]}}, r"name 'a/b' .* not allowed"),
        (
            {
                "datasets": [
                    {"name": "a", **splits(["a"])["a"]},
                    {"name": "a", **splits(["b"])["b"]},
                ]
            },
            r"dataset name `a` appears twice",
        ),
        ({"datasets": [splits(["a"])["a"]]}, r"`data.datasets\[0\]` needs a `name`"),
        ({"datasets": {"a": {"splitdataset": {}}}}, r"`data.datasets.a` has unknown key"),
        (
            {"sampling": {"mode": "weights", "weights": {"a": 1, "b": 0}}},
            r"`data.sampling.weights.b` must be a positive number",
        ),
        ({"sampling": {"mode": "mixed"}}, r"`data.sampling.mode` is `mixed`; allowed"),
        ({"sampling": {"mode": "balanced", "frames_per_batch": {"a": 1, "b": 2}}}, r"batch_size"),
        ({"primary": "z"}, r"`data.primary` is `z`"),
        ({"train_dataloader": {"batch_size": 2, "sampler": {}}}, r"train_dataloader.sampler"),
        ({"train_dataloader": {}}, r"`data.train_dataloader.batch_size` is required"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        _bad(**kw)


def test_a_dataset_too_small_for_balanced_batches_is_refused_at_setup():
    dm = _bad(
        sampling={"mode": "balanced", "frames_per_batch": {"a": 1, "b": 5}}, train_dataloader={}
    )
    with pytest.raises(
        ValueError, match=r"dataset `b` has 4 frames, fewer than the 5 .*frames_per_batch.b"
    ):
        dm.setup("fit")


# ----------------------------------------------------------------- DDP

#: frames of each dataset in one *global* balanced batch (each of 2 ranks takes half)
GLOBAL_FRAMES = {"a": 4, "b": 2}


@pytest.mark.ddp
@pytest.mark.parametrize("kind", ["nequip", "dataset_tasks"])
def test_two_gloo_ranks_split_the_one_process_batches(tmp_path, kind):
    """nequip's module, and dataset tasks (per-dataset sub-batch forwards, UPGrad on the
    all-reduced dataset-task rows): 2 ranks train exactly like 1 process on the global batch."""
    import sys

    from tests._ddp import launch

    for world in (1, 2):
        (tmp_path / str(world)).mkdir()
        launch(
            [
                sys.executable,
                "-m",
                "tests.multi_dataset_ddp_worker",
                str(tmp_path / str(world)),
                kind,
            ],
            world=world,
        )
    one = torch.load(tmp_path / "1" / "rank0.pt")
    ranks = [torch.load(tmp_path / "2" / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and one["world_size"] == 1
    assert {r["sampler"] for r in ranks} == {"MultiDatasetSampler"}  # not replaced by Lightning
    assert len(one["batches"]) == len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 2
    for t, (idx, e) in enumerate(one["batches"]):
        assert idx == [0, 0, 0, 0, 1, 1]
        (i0, e0), (i1, e1) = ranks[0]["batches"][t], ranks[1]["batches"][t]
        assert i0 == i1 == [0, 0, 1]
        assert not set(e0) & set(e1)  # disjoint frames
        assert sorted(e0 + e1) == sorted(e)  # together: the one-process batch
    # equal atoms per frame: the mean over 2 ranks' batches is the one-process mean
    assert torch.allclose(ranks[0]["params"], one["params"], rtol=0, atol=1e-10)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])


# ----------------------------------------------------------------- the documented config


def test_the_config_in_docs_datasets_trains(tmp_path):
    import re

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    page = (Path(__file__).resolve().parents[1] / "docs" / "datasets.md").read_text()
    block = re.search(r"```yaml\n(data:\n.*?)```", page, re.S).group(1)
    dm = instantiate(OmegaConf.create(block).data, _recursive_=False)  # as nequip-train
    assert isinstance(dm, MultiDatasetDataModule)
    rec = BatchRecorder()
    tr = trainer(tmp_path, max_epochs=1, callbacks=[rec, DatasetMetricNames()])
    tr.fit(module(dm), datamodule=dm)
    assert len(rec.batches) == 4  # pretrain: 8 frames, 2 a batch
    assert all(idx == [0, 0, 1] for idx, _ in rec.batches)
    assert {"val_pretrain_epoch/forces_mae", "val_new_epoch/forces_mae"} <= set(tr.callback_metrics)
    tester = trainer(tmp_path, inference_mode=False, callbacks=[DatasetMetricNames()])
    tester.test(module(dm), datamodule=dm)
    assert dm.test_dataloader_names == ["pretrain"]  # `new` has no test split
    assert torch.equal(
        tester.callback_metrics["test_pretrain_epoch/forces_mae"],
        tester.callback_metrics["test0_epoch/forces_mae"],
    )


def test_the_data_package_stays_cheap_and_the_sampler_pure():
    import subprocess
    import sys

    code = (
        "import sys, nequip_mtl.data as d\n"
        "assert not {'torch', 'nequip', 'lightning'} & set(sys.modules), 'eager import'\n"
        "import nequip_mtl.data.sampling\n"
        "assert 'lightning' not in sys.modules and 'nequip' not in sys.modules, 'impure sampler'\n"
        "assert d.MultiDatasetDataModule.__name__ == 'MultiDatasetDataModule'\n"
        "try:\n    d.NoSuchThing\nexcept AttributeError:\n    print('ok')\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**__import__("os").environ, "PYTHONPATH": root})  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ----------------------------------------------------------------- metrics by dataset name


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def _column(rows, key) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def test_each_printed_table_holds_its_own_dataset(tmp_path):
    """`trainer.validate`/`trainer.test` return the dicts Lightning prints as the
    "DataLoader j" columns: each holds the metrics of loader j's dataset only, under
    nequip's `val{j}_epoch/` names and the dataset's `val_<name>_epoch/` names, with equal
    values; the fit's checkpoint monitor `val0_epoch/weighted_sum` still works.

    Fails if the callback logs at the end of the epoch (where nequip logs, and Lightning
    gives every loader every metric), or leaves nequip's own epoch-end logging on."""
    datasets = {
        n: {"split_dataset": {"dataset": emt(SPECS[n][0], sum(SPECS[n][1:]) + 2),
                              "train": SPECS[n][1], "val": SPECS[n][2], "test": 2}}
        for n in ("a", "b")
    }  # fmt: skip
    dm = MultiDatasetDataModule(
        seed=5, datasets=datasets, stats_manager=STATS, val_dataloader={"batch_size": 4},
        test_dataloader={"batch_size": 4},
        sampling={"mode": "balanced", "frames_per_batch": {"a": 2, "b": 1}},
    )  # fmt: skip
    mod = module(dm)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val0_epoch/weighted_sum")
    tr = trainer(tmp_path, max_epochs=2, callbacks=[DatasetMetricNames(), ckpt],
                 enable_checkpointing=True, inference_mode=False)  # fmt: skip
    tr.fit(mod, datamodule=dm)
    assert ckpt.best_model_path and ckpt.best_model_score is not None
    for split, run in (("val", tr.validate), ("test", tr.test)):
        tables = run(mod, datamodule=dm, verbose=False)
        names = getattr(dm, f"{split}_dataloader_names")
        assert len(tables) == len(names) == 2
        for j, (table, name) in enumerate(zip(tables, names)):
            mine = {
                k for k in table if k.startswith((f"{split}{j}_epoch/", f"{split}_{name}_epoch/"))
            }
            assert mine == set(table), sorted(set(table) - mine)
            assert f"{split}{j}_epoch/weighted_sum" in table
            for key, value in table.items():
                if key.startswith(f"{split}{j}_epoch/"):
                    metric = key.split("/", 1)[1]
                    assert value == table[f"{split}_{name}_epoch/{metric}"], key
    assert tables[0]["test0_epoch/forces_mae"] > 0


def test_per_dataset_metrics_log_no_nan_and_no_doubled_name(tmp_path):
    """`PerDatasetMetrics` on each dataset's own loader (the multi-fidelity config): no
    column of metrics.csv is all-NaN, no metric name holds its dataset twice, the named
    metrics are the dataset's own components, and `val{j}_epoch/weighted_sum` (the
    checkpoint monitor) is the mean of that dataset's RMSEs, equal to its named copy.

    Fails if the other datasets' components are logged (`val0_epoch/xtb/*`: NaN), if the
    dataset prefix is kept in the named copy (`val_dft_epoch/dft/forces_mae`), or if the
    weighted sum keeps nequip's coefficients normalised over both datasets (half the mean)."""
    from lightning.pytorch.loggers import CSVLogger

    names = {"dft": "a", "xtb": "b"}  # the EMT specs of tests._harness
    datasets = {n: splits([s])[s] for n, s in names.items()}
    dm = MultiDatasetDataModule(
        seed=5, datasets=datasets, stats_manager=STATS, val_dataloader={"batch_size": 4},
        sampling={"mode": "balanced", "frames_per_batch": {"dft": 2, "xtb": 1}},
    )  # fmt: skip
    per_dataset = {"_target_": "nequip_mtl.train.PerDatasetMetrics", "datasets": ["dft", "xtb"]}
    torch.manual_seed(0)
    mod = NequIPLightningModule(
        **module_kwargs(
            num_datasets=dm.num_datasets,
            loss={"_target_": "nequip_mtl.train.PerDatasetLoss", "datasets": ["dft", "xtb"]},
            val_metrics=per_dataset,
            optimizer={"_target_": "torch.optim.Adam", "lr": 0.01},
        )
    )
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val0_epoch/weighted_sum")
    logger = CSVLogger(str(tmp_path), name="logs", version="")
    tr = trainer(tmp_path, max_epochs=2, callbacks=[DatasetMetricNames(), ckpt],
                 enable_checkpointing=True, logger=logger)  # fmt: skip
    tr.fit(mod, datamodule=dm)
    assert ckpt.best_model_score is not None
    rows = _csv(tmp_path / "logs" / "metrics.csv")
    columns = list(rows[0])
    empty = [c for c in columns if not any(r[c] not in ("", "nan") for r in rows)]
    assert not empty, empty
    for c in columns:
        for d in names:
            assert c.count(d) <= 1, c
    fields = ("per_atom_energy_mae", "per_atom_energy_rmse", "forces_mae", "forces_rmse")
    for j, d in enumerate(names):
        named = {c for c in columns if c.startswith(f"val_{d}_epoch/")}
        assert named == {f"val_{d}_epoch/{f}" for f in (*fields, "weighted_sum")}
        indexed = {c for c in columns if c.startswith(f"val{j}_epoch/")}
        assert indexed == {f"val{j}_epoch/{d}/{f}" for f in fields} | {f"val{j}_epoch/weighted_sum"}
        for f in fields:
            assert _column(rows, f"val_{d}_epoch/{f}") == _column(rows, f"val{j}_epoch/{d}/{f}")
        total = _column(rows, f"val{j}_epoch/weighted_sum")
        assert total == _column(rows, f"val_{d}_epoch/weighted_sum")
        assert len(total) == 3  # before training and after each of the 2 epochs
        energy = dict(_column(rows, f"val_{d}_epoch/per_atom_energy_rmse"))
        forces = dict(_column(rows, f"val_{d}_epoch/forces_rmse"))
        for step, value in total:
            assert value == pytest.approx((energy[step] + forces[step]) / 2, rel=1e-12)


def test_the_plot_reads_the_column_the_callback_logs():
    """The optimizer-steps column is named twice, in the callback that logs it and in the
    plot that reads it (the plot imports no Lightning, the callback no matplotlib)."""
    from nequip_mtl.plot import logs
    from nequip_mtl.train.callbacks import dataset_metric_names as metric_names

    assert metric_names.OPTIMIZER_STEPS == logs.OPTIMIZER_STEPS


def test_a_validation_before_training_is_logged_at_step_0(tmp_path):
    """The first validation of a fit is the initial model's: logged at step 0 with
    `val_optimizer_steps` 0, with exactly the values `trainer.validate` gives for an
    identically initialised module; later validations log the optimizer steps taken. The
    training itself is the same as without it; `validate_before_training=False` logs none.

    Fails if the validation before training is not run (or not logged)."""
    from lightning.pytorch.loggers import CSVLogger

    sampling = {"mode": "balanced", "frames_per_batch": {"a": 2, "b": 1}}

    def fit(root, **kw):
        dm = multi(("a", "b"), sampling=sampling, train_dataloader={})
        mod = module(dm)
        tr = trainer(root, max_epochs=2, callbacks=[DatasetMetricNames(**kw)],
                     logger=CSVLogger(str(root), name="logs", version=""))  # fmt: skip
        tr.fit(mod, datamodule=dm)
        return mod, tr, _csv(root / "logs" / "metrics.csv")

    mod, tr, rows = fit(tmp_path / "with")
    steps = _column(rows, "val_optimizer_steps")
    per_epoch = tr.global_step // 2
    assert steps == [(0, 0.0), (per_epoch - 1, per_epoch), (2 * per_epoch - 1, 2 * per_epoch)]
    dm = multi(("a", "b"), sampling=sampling, train_dataloader={})
    fresh = trainer(tmp_path / "fresh", callbacks=[DatasetMetricNames()], inference_mode=False)
    (table_a, table_b) = fresh.validate(module(dm), datamodule=dm, verbose=False)
    before = {**table_a, **table_b}
    for key in (
        "val_a_epoch/forces_mae",
        "val_b_epoch/per_atom_energy_rmse",
        "val1_epoch/weighted_sum",
    ):
        first_step, first = _column(rows, key)[0]
        assert first_step == 0 and first == pytest.approx(float(before[key]), rel=1e-12), key
    mod_off, _, rows_off = fit(tmp_path / "without", validate_before_training=False)
    assert [s for s, _ in _column(rows_off, "val_optimizer_steps")] == [
        per_epoch - 1,
        2 * per_epoch - 1,
    ]
    assert (
        _column(rows_off, "val_a_epoch/forces_mae") == _column(rows, "val_a_epoch/forces_mae")[1:]
    )
    assert torch.equal(params(mod), params(mod_off))


@pytest.mark.ddp
def test_dataset_metric_names_under_two_gloo_ranks(tmp_path):
    """Under DDP every rank computes (and syncs) each loader's metrics at that loader's last
    batch, and the validation before training runs on every rank: no rank waits for
    another, and every rank logs the same values under the same names (the per-dataset
    metrics of the dataset's own loader only)."""
    import sys

    from tests._ddp import launch

    launch([sys.executable, "-m", "tests.multi_dataset_ddp_worker", str(tmp_path), "named"], 2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["val"] == ranks[1]["val"]
    names = set(ranks[0]["val"])
    assert {"val_a_epoch/forces_mae", "val_b_epoch/forces_rmse", "val0_epoch/a/forces_mae"} <= names
    assert "val0_epoch/weighted_sum" in names and "val_optimizer_steps" in names
    assert not [n for n in names if "epoch/b/" in n and n.startswith(("val0", "val_a"))]

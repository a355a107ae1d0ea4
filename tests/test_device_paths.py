"""What the accelerator paths rely on, checked on the CPU: no float64 where the device has none
(Apple's MPS), and the packed trainer running only what it can apply."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from normbench import evaluation
from normbench.tracking import RunDir


class NoFloat64(TorchDispatchMode):
    """Fails on the first op that makes a float64 tensor (what MPS cannot do)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise AssertionError(f"{func} made a float64 tensor")
        return out


def test_the_float64_guard_catches_float64():
    with pytest.raises(AssertionError, match="float64"):
        with NoFloat64():
            torch.ones(3).double()


def test_a_run_trains_and_evaluates_without_float64_on_a_device_without_it(tiny_cfg, monkeypatch):
    """The CPU stands in for MPS (evaluation.NO_FLOAT64): training, the per-epoch evaluation,
    the train-mode evaluation and the end-of-run measurements make no float64 tensor."""
    from normbench.training import entry

    monkeypatch.setattr(evaluation, "NO_FLOAT64", {"mps", "cpu"})
    cfg = tiny_cfg(**{"norm.kind": "bn", "analysis.dead_units": True, "analysis.train_mode_eval": True})
    with NoFloat64():
        summary = entry.train(cfg)
    assert summary["status"] == "completed" and summary["final_test_acc"] is not None
    assert summary["test_acc_train_mode"] is not None


def test_a_packed_evaluation_makes_no_float64_on_a_device_without_it(tiny_cfg, monkeypatch):
    from normbench.data import load_cifar10
    from normbench.progress import Progress
    from normbench.training.packed import PackedStepper
    from normbench.training.run import Run

    monkeypatch.setattr(evaluation, "NO_FLOAT64", {"mps", "cpu"})
    cfgs = [tiny_cfg(seed=s) for s in range(2)]
    data = load_cifar10(cfgs[0].data, log=lambda m: None)
    stepper = PackedStepper([Run(c, RunDir(c.run_dir()), Progress(), data=data) for c in cfgs])
    with NoFloat64():
        results = stepper.evaluate()
    assert len(results) == 2 and all(0.0 <= r["acc"] <= 1.0 for r in results)


def test_evaluation_sums_in_float64_where_the_device_has_it():
    assert evaluation.sum_dtype(torch.device("cpu")) == torch.float64
    assert evaluation.sum_dtype(torch.device("mps")) == torch.float32


def test_packing_leaves_out_what_a_packed_network_would_not_run(tiny_cfg):
    """bf16 autocast and an explicit compile mode apply to a run's own step: such cells train
    alone (the reason is named) instead of packed without them."""
    from normbench.training.packing import why_not_packable

    assert why_not_packable(tiny_cfg()) is None
    assert "train.amp=bf16" in why_not_packable(tiny_cfg(**{"train.amp": "bf16"}))
    assert "train.compile=default" in why_not_packable(tiny_cfg(**{"train.compile": "default"}))
    assert why_not_packable(tiny_cfg(**{"train.compile": "none"})) is None


def test_packed_members_say_they_ran_eager(tiny_cfg):
    from normbench.training.packed import train_packed

    summaries = train_packed([tiny_cfg(seed=s, **{"train.epochs": 1}) for s in range(2)])
    assert [s["packed_members"] for s in summaries] == [2, 2]
    assert all(s["compiled"] is None and s["status"] == "completed" for s in summaries)


# ----------------------------------------------------------------------------- local sweep GPUs


def cells_on(*devices):
    from types import SimpleNamespace

    return [SimpleNamespace(cfg=SimpleNamespace(device=d)) for d in devices]


def test_workers_are_spread_over_the_gpus_the_user_made_visible():
    from normbench.sweep.layout import GpuSlots, visible_gpus, worker_gpus

    assert visible_gpus(None, 2) == ["0", "1"]
    assert visible_gpus("2,3", 2) == ["2", "3"]  # not 0 and 1
    assert visible_gpus("GPU-a1b2, GPU-c3d4", 2) == ["GPU-a1b2", "GPU-c3d4"]
    assert worker_gpus(cells_on("cuda", "cuda"), "2,3", 2) == ["2", "3"]
    assert worker_gpus(cells_on("auto"), None, 1) == ["0"]
    assert worker_gpus(cells_on("cpu"), "2,3", 2) == []  # nothing to pin
    assert worker_gpus(cells_on("cuda", "cuda:1"), "2,3", 2) == []  # a cell names its own index
    slots = GpuSlots(["2", "3"], workers=2)
    assert [slots.take(0), slots.take(1)] == ["2", "3"]


def test_a_respawned_worker_takes_the_gpu_of_the_worker_it_replaces():
    from normbench.sweep.layout import GpuSlots

    slots = GpuSlots(["2", "3"], workers=2)
    slots.take(0), slots.take(1)
    slots.release(0)  # worker 0 died
    assert slots.take(2) == "2"  # its replacement: the same GPU, not a second one on "3"
    slots.release(1)
    slots.release(2)
    assert [slots.take(3), slots.take(4)] == ["2", "3"]
    assert GpuSlots([], workers=2).take(0) is None  # no pinning: the worker sees what the sweep sees


def test_a_sweep_on_cuda_without_cuda_is_refused_before_any_cell_starts(tmp_path, synth_root):
    """One line, exit 2, no run folder: not every cell started, failed and counted."""
    from typer.testing import CliRunner

    from normbench.cli import app

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"out_dir: {tmp_path / 'runs'}\nset: {{device: cuda, data.root: {synth_root}, "
                     "model.width: 0.25}\ngrid: {seed: [0, 1]}\n")
    res = CliRunner().invoke(app, ["sweep", str(sweep), "--no-progress"])
    assert res.exit_code == 2 and "device: got 'cuda' but CUDA is not available" in res.output
    assert "sweep cell 0" in res.output and not (tmp_path / "runs").exists()


def test_ray_cells_on_cuda_without_a_gpu_share_are_refused(tmp_path):
    from typer.testing import CliRunner

    from normbench.cli import app

    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"out_dir: {tmp_path / 'runs'}\nset: {{device: cuda}}\ngrid: {{seed: [0]}}\n")
    res = CliRunner().invoke(app, ["sweep", str(sweep), "--backend", "ray", "--address", "10.0.0.1:6379"])
    assert res.exit_code == 2 and "--gpus-per-cell" in res.output


def test_a_private_ray_instance_has_room_for_what_the_gpu_shares_allow():
    from normbench.sweep.layout import ray_local_cpus

    assert ray_local_cpus(workers=2, threads=3, gpus_per_cell=0.0, gpus=2) == 6
    assert ray_local_cpus(workers=2, threads=3, gpus_per_cell=0.5, gpus=2) == 12  # 4 cells on 2 GPUs
    assert ray_local_cpus(workers=2, threads=1, gpus_per_cell=1.0, gpus=2) == 2


# ----------------------------------------------------------------------------- torchrun


def test_nproc_above_the_gpu_count_is_one_line(monkeypatch):
    from typer.testing import CliRunner

    from normbench.cli import app

    fake_gpu(monkeypatch, capability=(9, 0), name="H100")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    res = CliRunner().invoke(app, ["train", "--nproc", "3", "--set", "device=cuda"])
    assert res.exit_code == 2 and "--nproc: got 3 but this machine has 2 CUDA device(s)" in res.output


def test_a_rank_takes_its_gpu_before_it_joins_the_process_group(monkeypatch):
    """NCCL binds the group to the current device: set_device comes first; a local rank
    beyond the GPUs is one line, not a hang in init_process_group."""
    from normbench import distributed
    from normbench.errors import UserError

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, timeout: calls.append(("init", backend)))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    ctx = distributed.init_from_env(torch.device("cuda"))
    assert calls == [("set_device", 1), ("init", "nccl")] and ctx.local_rank == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="one process per GPU"):
        distributed.init_from_env(torch.device("cuda"))


# ----------------------------------------------------------------------------- which GPU, said how


def fake_gpu(monkeypatch, capability=(7, 5), name="Tesla T4", bf16=False, arches=("sm_75", "sm_80", "sm_90")):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arches))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)


def test_a_gpu_older_than_the_wheel_is_refused_in_one_line_and_auto_passes_it_over(monkeypatch):
    from normbench.device import device_line, resolve_device
    from normbench.errors import UserError

    fake_gpu(monkeypatch, capability=(6, 1), name="GeForce GTX 1080")
    with pytest.raises(UserError, match=r"GeForce GTX 1080 \(sm_61\) is older than this torch build supports "
                                        r"\(sm_75 and newer"):
        resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "mps")
    assert "sm_61) is older" in device_line("auto", resolve_device("auto"))


def test_every_run_says_which_device_and_why(monkeypatch):
    from normbench.device import device_line

    assert device_line("cpu", torch.device("cpu")) == "device: cpu (as configured)"
    assert device_line("auto", torch.device("cpu")).startswith("device: cpu (auto: CUDA not used: ")
    fake_gpu(monkeypatch)
    line = device_line("auto", torch.device("cuda", 0))
    assert line.startswith("device: cuda:0 (Tesla T4, sm_75; torch ") and "(auto: a CUDA GPU" in line


def test_bf16_on_a_gpu_without_native_bf16_is_refused(monkeypatch, tiny_cfg):
    from normbench.device import check_amp
    from normbench.errors import UserError

    fake_gpu(monkeypatch, bf16=False)
    with pytest.raises(UserError, match="train.amp: got 'bf16' but Tesla T4 has no native bf16"):
        check_amp(tiny_cfg(**{"train.amp": "bf16"}), torch.device("cuda", 0))
    check_amp(tiny_cfg(), torch.device("cuda", 0))  # no autocast asked: fine
    fake_gpu(monkeypatch, capability=(9, 0), name="H100", bf16=True)
    check_amp(tiny_cfg(**{"train.amp": "bf16"}), torch.device("cuda", 0))


# ----------------------------------------------------------------------------- compiled graphs

CREATION = {"zeros", "ones", "tensor", "full", "empty", "arange", "eye", "scalar_tensor"}


def host_tensor_nodes(module, x) -> list[str]:
    """The nodes of ``module``'s compiled forward graph (on ``x``'s device) that create a
    tensor on the host or copy one to the device: each is a host sync on CUDA every step."""
    import torch._dynamo

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(module, backend=capture, fullgraph=True)
    compiled(x)
    bad = []
    for gm in graphs:
        for node in gm.graph.nodes:
            name = getattr(node.target, "__name__", str(node.target))
            if node.op == "call_function" and name in CREATION:
                device = node.kwargs.get("device")
                if device is None or torch.device(device).type == "cpu":
                    bad.append(f"{name}{node.args} on {device}")
            if node.op == "call_method" and name == "to":  # a copy between devices (a dtype cast is fine)
                targets = list(node.args[1:]) + [node.kwargs.get("device")]
                if any(isinstance(t, (torch.device, str)) for t in targets):
                    bad.append(f"to{node.args}")
    torch._dynamo.reset()
    return bad


@pytest.mark.parametrize("ghost", [4, 3])
def test_compiled_ghost_bn_creates_no_host_tensors(ghost):
    """Ghost BN's chunk tables are made on the batch's device (on CUDA a host-made table is a
    copy and a sync every step, and keeps reduce-overhead from CUDA graphs). The meta device
    takes the non-CPU branches, as CUDA does."""
    from normbench.norms.ghost_batch_norm import GhostBatchNorm2d

    layer = GhostBatchNorm2d(8, 1e-5, 0.1, ghost, "per_step", "layer").to("meta").train()
    assert host_tensor_nodes(layer, torch.empty(8, 8, 4, 4, device="meta")) == []


def ops_run(fn, *args) -> list[str]:
    names = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            names.append(str(func))
            return func(*a, **(kw or {}))

    with Record():
        fn(*args)
    return names


@pytest.mark.parametrize("groups", [None, 4])
def test_moments_of_channels_last_input_off_the_cpu_copy_nothing(groups):
    """Batch Renorm's and EvoNorm-S0's statistics off the CPU (the meta device stands in for a
    GPU): channels_last input is reduced through a view, never copied to NCHW first; the
    values equal those of the NCHW tensor."""
    from normbench.norms.speed.functional import moments

    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    meta = torch.empty(2, 8, 5, 5, device="meta").contiguous(memory_format=torch.channels_last)
    names = ops_run(moments, meta, groups)
    assert not [n for n in names if "clone" in n or "copy" in n], names
    cl = x.contiguous(memory_format=torch.channels_last)  # the branch's maths, on values
    view = cl.permute(0, 2, 3, 1).reshape(2, 25, groups or 8, 8 // (groups or 8))
    var, mean = torch.var_mean(view, dim=(1, 3), unbiased=False)
    ref_var, ref_mean = torch.var_mean(x.reshape(2, groups or 8, -1), dim=-1, unbiased=False)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


def test_off_the_cpu_the_memory_format_follows_its_own_rule(tiny_cfg):
    from normbench.device import use_channels_last

    gpu = torch.device("meta")  # any device that is not the CPU
    for kind in ("bn", "gn", "frn"):
        assert not use_channels_last(tiny_cfg(**{"norm.kind": kind}), gpu, kernels=False)
        assert use_channels_last(tiny_cfg(**{"norm.kind": kind, "train.amp": "bf16"}), gpu, kernels=False)
    assert use_channels_last(tiny_cfg(**{"train.channels_last": True}), gpu, kernels=False)

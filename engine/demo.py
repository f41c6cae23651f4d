"""The demo: synthetic identities -> 2 CPU ranks through the real launcher -> verification on held-out
identities, compared with a raw-pixel baseline computed on the same pairs.

    python tools/demo.py            # what README's first command runs
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from engine.launch import malloc_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_command(script: str, ranks: int, *, master_port: int | None = None,
                     prefer: str = "deepspeed") -> tuple[list[str], str]:
    """The command that starts `ranks` processes of `script` on this machine, and its kind
    (`deepspeed`, or `torchrun` when DeepSpeed is not installed)."""
    port = str(master_port or _free_port())
    try:
        import deepspeed  # noqa: F401
        have_deepspeed = True
    except ImportError:
        have_deepspeed = False
    if prefer == "deepspeed" and have_deepspeed:
        exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        head = [exe] if os.path.exists(exe) else [sys.executable, "-m", "deepspeed.launcher.runner"]
        return head + ["--num_gpus", str(ranks), "--master_port", port, script], "deepspeed"
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_addr", "127.0.0.1", "--master_port", port, script], "torchrun"


def rank_env(ranks_per_node: int, base: dict | None = None) -> dict:
    """Environment for CPU rank processes: allocator settings, threads = cores / ranks."""
    env = malloc_env(base)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks_per_node)))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _is_noise(line: str) -> bool:
    """DeepSpeed/torch chatter that the demo keeps in the log file but not on the console."""
    low = line.lower()
    return line.startswith("[20") or "warn" in low or line.startswith("[rank") or "deepspeed" in low \
        or line.strip() == "" or "cmd =" in line or line.startswith("  return ")


def run_training(config: str, overrides: list[str], ranks: int, log_path: str, *, prefer: str = "deepspeed",
                 echo: bool = True, timeout: float | None = None) -> int:
    """Starts the job through the launcher and streams its output to `log_path` (and, filtered, stdout)."""
    cmd, kind = launcher_command(os.path.join(ROOT, "tools", "train.py"), ranks, prefer=prefer)
    cmd += ["--config", config]
    for item in overrides + (["engine=ddp"] if kind == "torchrun" else []):
        cmd += ["--set", item]
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=rank_env(ranks), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        deadline = None if timeout is None else time.monotonic() + timeout
        for line in proc.stdout:
            log.write(line)
            if echo and not _is_noise(line):
                print("  " + line.rstrip(), flush=True)
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                break
        return proc.wait()


def raw_pixel_accuracy(bin_path: str) -> float:
    """10-fold verification accuracy of the held-out pairs with raw pixels (centred) as embeddings."""
    from engine.evaluation.bins import load_verification_set
    from engine.evaluation.verification import verification_metrics

    vset = load_verification_set(bin_path)
    pixels = vset.images.reshape(len(vset.images), -1).astype(np.float64) / 127.5 - 1.0
    pixels -= pixels.mean(axis=1, keepdims=True)
    return verification_metrics(pixels, vset.issame, name="raw_pixels").accuracy


def plot_summary(losses: list[float], trained: float | None, baseline: float, path: str) -> str:
    """Loss per step and the two held-out accuracies, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    ax_loss.plot(range(1, len(losses) + 1), losses, lw=1)
    ax_loss.set(xlabel="step", ylabel="loss (global batch)", title="training loss")
    ax_loss.grid(alpha=0.3)
    names = ["raw pixels", "trained"]
    values = [100 * baseline, 100 * trained if trained is not None else 0.0]
    bars = ax_acc.bar(names, values, color=["#999999", "#2a7ab9"])
    ax_acc.bar_label(bars, fmt="%.1f%%")
    ax_acc.set(ylim=(40, 100), ylabel="10-fold accuracy (%)", title="held-out verification")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(out_dir: str = "runs/demo", config: str = "configs/demo.yaml", ranks: int = 2,
             overrides: list[str] | None = None) -> dict:
    from engine.config import load_config
    from engine.data import write_synthetic

    start = time.perf_counter()
    out_dir = os.path.abspath(os.path.join(ROOT, out_dir) if not os.path.isabs(out_dir) else out_dir)
    config = config if os.path.isabs(config) else os.path.join(ROOT, config)
    data_dir = os.path.join(out_dir, "data")
    overrides = [f"output_dir={out_dir}", f"data.shards={data_dir}"] + list(overrides or [])
    cfg = load_config(config, overrides)
    syn = cfg.synthetic

    print(f"[1/3] synthetic identities -> {data_dir}", flush=True)
    if not os.path.exists(os.path.join(data_dir, "train-manifest.json")):
        manifest = write_synthetic(data_dir, syn.num_identities, images_per_identity=syn.images_per_identity,
                                   heldout_identities=syn.heldout_identities, heldout_pairs=syn.heldout_pairs,
                                   seed=syn.seed, shard_size=syn.shard_size, workers=syn.workers)
    else:
        with open(os.path.join(data_dir, "train-manifest.json")) as f:
            manifest = json.load(f)
    print(f"      {manifest['num_classes']} identities, {manifest['num_images']} images "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

    log_path = os.path.join(out_dir, "train.log")
    print(f"[2/3] training on {ranks} CPU ranks through the launcher (full log: {log_path})", flush=True)
    if os.path.exists(os.path.join(out_dir, "result.json")):
        os.remove(os.path.join(out_dir, "result.json"))
    code = run_training(config, overrides, ranks, log_path)
    if code != 0:
        raise SystemExit(f"training failed with exit code {code}; see {log_path}")
    with open(os.path.join(out_dir, "result.json")) as f:
        result = json.load(f)

    print("[3/3] verification on held-out identities", flush=True)
    heldout = os.path.join(data_dir, "heldout.bin")
    baseline = raw_pixel_accuracy(heldout)
    trained = result["eval"].get("heldout")
    summary = {
        "trained_accuracy": trained, "raw_pixel_accuracy": baseline,
        "first_loss": result["first_loss"], "last_loss": result["last_loss"], "steps": result["steps"],
        "samples_per_second": result["samples_per_second"], "checkpoint": result["checkpoint"],
        "log": log_path, "tensorboard": result["tensorboard_dir"], "config": os.path.join(out_dir, "config.yaml"),
        "wall_seconds": time.perf_counter() - start,
    }
    summary["plot"] = plot_summary(result["losses"], trained, baseline, os.path.join(out_dir, "demo.png"))
    with open(os.path.join(out_dir, "demo.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("", flush=True)
    print(f"held-out verification accuracy ({heldout}):", flush=True)
    print(f"  trained {cfg.model.backbone} backbone : {100 * trained:.2f}%" if trained is not None
          else "  trained backbone : (no evaluation result)", flush=True)
    print(f"  raw-pixel baseline      : {100 * baseline:.2f}%", flush=True)
    print(f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} over {result['steps']} steps, "
          f"{result['samples_per_second']:.1f} samples/s", flush=True)
    print(f"checkpoint : {result['checkpoint']}", flush=True)
    print(f"log        : {log_path}", flush=True)
    print(f"tensorboard: {result['tensorboard_dir']}  (tensorboard --logdir {result['tensorboard_dir']})", flush=True)
    print(f"plot       : {summary['plot']}", flush=True)
    print(f"wall time  : {summary['wall_seconds']:.0f} s", flush=True)
    return summary

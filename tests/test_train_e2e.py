"""End to end through the real launchers, on CPU:

- one run of the tiny recipe under `deepspeed --num_gpus 2`: the loss falls, TensorBoard files appear, a
  backbone checkpoint is written, and a real Prometheus server scraping every rank's port (the shipped
  configs/prometheus.yml with the test's ports) reports a positive rate() of the samples counter per rank;
- two "nodes" on one machine: two `deepspeed --no_ssh --node_rank={0,1}` launchers form one 2-rank job.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from multirank import free_port

from engine.demo import launcher_command, rank_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train.py")
RECIPE = os.path.join(ROOT, "configs", "tiny_synthetic.yaml")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from engine.data import write_synthetic

    out = str(tmp_path_factory.mktemp("data"))
    write_synthetic(out, 40, images_per_identity=8, heldout_identities=10, heldout_pairs=40, seed=1,
                    shard_size=200, workers=1, progress=False)
    return out


def _overrides(out_dir, data_dir, steps, extra=()):
    return [f"output_dir={out_dir}", f"data.shards={data_dir}", f"schedule.steps={steps}",
            "schedule.warmup_steps=2", "data.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=100",
            "model.embedding_size=64", "metrics.log_every=5", *extra]


def _cmd(base, overrides):
    cmd = list(base) + ["--config", RECIPE]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def _get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _start_prometheus(tmp_path, metric_ports):
    exe = shutil.which("prometheus")
    if exe is None:
        return None, None
    with open(os.path.join(ROOT, "configs", "prometheus.yml")) as f:
        scrape = yaml.safe_load(f)
    job = scrape["scrape_configs"][0]
    job["scrape_interval"], job["scrape_timeout"] = "1s", "1s"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{p}" for p in metric_ports]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(scrape))
    port = free_port()
    proc = subprocess.Popen([exe, f"--config.file={path}", f"--web.listen-address=127.0.0.1:{port}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/-/ready", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("prometheus did not become ready")


def _rates(url):
    query = urllib.parse.quote('rate(shardface_train_samples_total[1m])')
    data = _get_json(f"{url}/api/v1/query?query={query}")
    return {r["metric"]["rank"]: float(r["value"][1]) for r in data["data"]["result"]}


@pytest.fixture(scope="module")
def deepspeed_run(tiny_data, tmp_path_factory):
    """One 2-rank run shared by the loss / TensorBoard / checkpoint / Prometheus checks."""
    tmp = tmp_path_factory.mktemp("run")
    out_dir = str(tmp / "out")
    base_port = free_port()
    while base_port + 1 > 65535:
        base_port = free_port()
    prom, prom_url = _start_prometheus(tmp, [base_port, base_port + 1])
    launch, kind = launcher_command(TRAIN, 2)
    assert kind == "deepspeed"
    overrides = _overrides(out_dir, tiny_data, 24, [f"metrics.prometheus_port={base_port}", "optim.lr=0.2"])
    log = open(tmp / "train.log", "w")
    proc = subprocess.Popen(_cmd(launch, overrides), cwd=ROOT, env=rank_env(2), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    rates, polled_after_exit = {}, None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if prom_url is not None:
                try:
                    rates = _rates(prom_url)
                except OSError:
                    pass
            if proc.poll() is not None:
                polled_after_exit = polled_after_exit or time.monotonic()
                if prom_url is None or len(rates) >= 2 or time.monotonic() - polled_after_exit > 10:
                    break
            if prom_url is not None and len(rates) >= 2 and all(v > 0 for v in rates.values()):
                break
            time.sleep(0.5)
        code = proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=10)
        log.close()
    text = (tmp / "train.log").read_text()
    assert code == 0, text[-4000:]
    return {"out_dir": out_dir, "rates": rates, "prometheus": prom_url is not None, "log": text}


def test_loss_falls_over_a_short_deepspeed_run(deepspeed_run):
    with open(os.path.join(deepspeed_run["out_dir"], "result.json")) as f:
        result = json.load(f)
    losses = result["losses"]
    assert result["steps"] == 24 and len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    assert "heldout" in result["eval"]
    assert os.path.exists(result["checkpoint"])


def test_tensorboard_has_the_loss_curve(deepspeed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = os.path.join(deepspeed_run["out_dir"], "tensorboard")
    acc = EventAccumulator(tb)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm_backbone", "train/grad_norm_head"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 25))
    assert any(t.startswith("verification/heldout/accuracy") for t in tags)


def test_prometheus_scrapes_a_positive_sample_rate_from_every_rank(deepspeed_run):
    if not deepspeed_run["prometheus"]:
        pytest.skip("the prometheus binary is not installed (tools/setup.sh apt-installs it as root)")
    rates = deepspeed_run["rates"]
    assert set(rates) == {"0", "1"}, rates
    assert all(v > 0 for v in rates.values()), rates


def test_two_nodes_on_one_machine_form_one_job(tiny_data, tmp_path):
    """Two launchers with --no_ssh and node ranks 0 and 1 (one rank each) train the tiny recipe together."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    out_dir = str(tmp_path / "out")
    overrides = _overrides(out_dir, tiny_data, 3, ["metrics.prometheus=false", "metrics.tensorboard=false"])
    procs = []
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    for node in (0, 1):
        launch = [exe, "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={node}", "--master_addr",
                  "127.0.0.1", "--master_port", str(port), TRAIN]
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append((subprocess.Popen(_cmd(launch, overrides), cwd=ROOT, env=rank_env(1), stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))
    try:
        codes = [p.wait(timeout=200) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            log.close()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in logs)
    assert "2 rank(s) x 16" in logs[0], logs[0][-3000:]
    with open(os.path.join(out_dir, "result.json")) as f:
        assert json.load(f)["steps"] == 3

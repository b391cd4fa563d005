"""`luigi-creds exec`'s bootstrap (luigi_creds/bootstrap/sitecustomize.py): what it loads into
the command's Python processes, when, and that it leaves other processes as they were.

Each case runs a fresh interpreter with the bootstrap first on PYTHONPATH, as exec sets it; no
server is needed (a job's end-to-end run under exec is in tests/test_luigi_e2e.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from luigi_creds.childenv import BOOTSTRAP_DIR, PRELOAD_VARIABLE, with_preload
from luigi_creds.launch import EARLY_START_VARIABLE
from luigi_creds.preload import agent_container_source

REPO_ROOT = Path(__file__).resolve().parents[1]

# Reports which luigi_creds modules are loaded at each step, and what stays on sys.meta_path.
PROBE = """
import json, sys
def state():
    return {
        "task_process": "luigi_creds.task_process" in sys.modules,
        "aws": "luigi_creds.aws" in sys.modules,
        "watching": any(type(f).__name__ == "_Watch" for f in sys.meta_path),
        "early_start": hasattr(
            getattr(sys.modules.get("luigi.worker"), "TaskProcess", None),
            "luigi_creds_launcher",
        ),
    }
steps = {"start": state()}
if "luigi" in sys.argv:
    import warnings
    warnings.simplefilter("ignore", DeprecationWarning)
    import luigi
    steps["luigi"] = state()
    steps["luigi_loader"] = type(luigi.__loader__).__name__
if "boto3" in sys.argv:
    import boto3
    steps["boto3"] = state()
    session = boto3.DEFAULT_SESSION
    steps["default_session"] = None if session is None else [
        p.METHOD for p in session._session.get_component("credential_provider").providers
    ]
steps["chained"] = getattr(sys.modules.get("sitecustomize"), "CHAINED", None)
print(json.dumps(steps))
"""


def _run(env_extra: dict[str, str], *imports: str, base_path: str = "") -> dict:  # type: ignore[type-arg]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUIGI_CREDS_", "PYTHONPATH"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), base_path) if p)
    env.update(env_extra)
    env = with_preload(env)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *imports],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


AGENT_URL = "http://127.0.0.1:9"
AGENT = {"LUIGI_CREDS_AGENT_URL": AGENT_URL, "LUIGI_CREDS_AGENT_TOKEN": "b"}
# What exec gives a command for an AWS grant: the agent's container-credentials endpoint.
CONTAINER = {
    "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{AGENT_URL}/v1/aws?grant=etl-writer",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN": "b",
}


def test_with_preload_puts_the_bootstrap_first_once() -> None:
    env = with_preload({"PYTHONPATH": os.pathsep.join(["/a", BOOTSTRAP_DIR, "/b"])})
    assert env["PYTHONPATH"] == os.pathsep.join([BOOTSTRAP_DIR, "/a", "/b"])
    assert with_preload({})["PYTHONPATH"] == BOOTSTRAP_DIR
    assert with_preload(env) == env
    off = {PRELOAD_VARIABLE: "0", "PYTHONPATH": "/a"}
    assert with_preload(off) == off
    assert (Path(BOOTSTRAP_DIR) / "sitecustomize.py").is_file()


def test_luigi_under_an_agent_preloads_the_task_process_modules() -> None:
    steps = _run(AGENT, "luigi", "boto3")
    assert steps["start"] == {
        "task_process": False,
        "aws": False,
        "watching": True,
        "early_start": False,
    }
    # Once luigi is in, the module Luigi imports in each task process is too, and Luigi's fork
    # starts each task's credentials first; the boto3 bridge waits for boto3, then the hook is
    # gone.
    assert steps["luigi"] == {
        "task_process": True,
        "aws": False,
        "watching": True,
        "early_start": True,
    }
    assert steps["boto3"] == {
        "task_process": True,
        "aws": True,
        "watching": False,
        "early_start": True,
    }
    assert steps["luigi_loader"] == "SourceFileLoader"  # luigi keeps its own loader


def test_the_early_start_alone_can_be_turned_off() -> None:
    steps = _run({**AGENT, EARLY_START_VARIABLE: "0"}, "luigi")
    assert steps["luigi"]["task_process"] and not steps["luigi"]["early_start"]


def test_a_process_that_never_imports_luigi_loads_nothing() -> None:
    steps = _run({**AGENT, **CONTAINER}, "boto3")
    assert steps["boto3"] == {
        "task_process": False,
        "aws": False,
        "watching": True,
        "early_start": False,
    }
    assert steps["default_session"] is None


def test_the_scheduling_process_gets_the_agents_credentials_on_scaled_windows() -> None:
    """Under exec's container endpoint, boto3's default session asks the agent through our
    provider alone (nothing is fetched until a client needs credentials)."""
    steps = _run({**AGENT, **CONTAINER}, "luigi", "boto3")
    assert steps["default_session"] == ["luigi-creds"]
    # Another container endpoint than the agent's, or none: boto3 is left alone.
    other = {**CONTAINER, "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/x"}
    assert _run({**AGENT, **other}, "luigi", "boto3")["default_session"] is None
    assert _run(AGENT, "luigi", "boto3")["default_session"] is None


def test_agent_container_source_reads_grant_and_task() -> None:
    env = {**AGENT, **CONTAINER, "LUIGI_CREDS_AGENT_TOKEN": "job-bearer"}
    source = agent_container_source(env)
    assert source is not None
    endpoint, grant, task = source
    assert (endpoint.url, endpoint.bearer, grant, task) == (AGENT_URL, "b", "etl-writer", None)
    with_task = {
        **env,
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{AGENT_URL}/v1/aws?grant=g&task=T%281%29",
    }
    assert agent_container_source(with_task) is not None
    assert agent_container_source(with_task)[1:] == ("g", "T(1)")  # type: ignore[index]
    assert agent_container_source({**env, "AWS_CONTAINER_AUTHORIZATION_TOKEN": ""}) is None
    assert agent_container_source(CONTAINER) is None  # no agent


def test_no_preload_without_an_agent_or_when_turned_off() -> None:
    for extra in ({}, {**AGENT, PRELOAD_VARIABLE: "0"}):
        steps = _run(extra, "luigi", "boto3")
        assert steps["luigi"] == {
            "task_process": False,
            "aws": False,
            "watching": False,
            "early_start": False,
        }, extra
        assert steps["boto3"]["task_process"] is False


def test_the_shadowed_sitecustomize_still_runs(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("CHAINED = 'yes'\n")
    steps = _run(AGENT, "luigi", base_path=str(tmp_path))
    assert steps["chained"] == "yes"
    assert steps["luigi"]["task_process"] is True


def test_the_bootstrap_reached_twice_through_a_link_runs_once(tmp_path: Path) -> None:
    """The bootstrap directory also later on sys.path under another name (a symlink) is not
    taken for the sitecustomize it shadows."""
    link = tmp_path / "bootstrap-link"
    link.symlink_to(BOOTSTRAP_DIR, target_is_directory=True)
    steps = _run(AGENT, "luigi", base_path=str(link))
    assert steps["luigi"]["task_process"] is True
    assert steps["chained"] is None

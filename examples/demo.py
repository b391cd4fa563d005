"""`make demo`: the whole flow on one machine, in one command, with nothing to set up by hand.

Owns the demo's script: start the dev stack (`broker.dev.stack`: local OIDC issuer, OpenBao, moto,
the broker), mint one GitLab-shaped CI token, run the `examples.pipeline` Luigi pipeline with two
workers (every task gets its own short-lived credentials through one refresh session), revoke
the session as an operator would, stop the broker, print `audit report` and `audit verify`, and
tear everything down. The CI token lives only in this process's environment; every file (the
luigi config, task outputs, AppRole files, the audit database) is in the stack's private 0700
state directory, deleted at the end.

Talks to the dev issuer (one token), and runs `luigi-creds-broker` subcommands as child processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

from broker.dev.cli import mint_token
from broker.dev.stack import TOKEN_VARIABLE, DevStack, DevState, postgres_url

PARTS = 3
WORKERS = 2


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def broker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `luigi-creds-broker ARGS` (this interpreter, this checkout) and echo its output."""
    result = subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    print(textwrap.indent(result.stdout.rstrip(), "  "), flush=True)
    if result.stderr.strip():
        print(textwrap.indent(result.stderr.rstrip(), "  "), file=sys.stderr, flush=True)
    return result


def write_demo_config(state: DevState, workdir: Path) -> Path:
    """The pipeline's own settings, beside the stack's `[luigi_creds]` luigi.cfg; nothing secret."""
    path = Path(state.state_dir) / "demo.cfg"
    path.write_text(
        textwrap.dedent(
            f"""\
            [core]
            autoload_range = false

            [demo]
            workdir = {workdir}
            bucket = {state.bucket}
            aws_endpoint_url = {state.aws_endpoint_url}
            pg_url = {postgres_url() or ""}
            """
        ),
        encoding="utf-8",
    )
    return path


def run_pipeline(state: DevState) -> bool:
    """Run the Luigi pipeline against the stack; True if every task succeeded."""
    workdir = Path(state.state_dir) / "outputs"
    workdir.mkdir(mode=0o700)
    demo_config = write_demo_config(state, workdir)
    with warnings.catch_warnings():
        # Luigi 3.8 warns at import about a default it will change; our luigi.cfg sets it.
        warnings.simplefilter("ignore", DeprecationWarning)
        import luigi
        import luigi.configuration

    luigi.configuration.add_config_path(state.luigi_config)
    luigi.configuration.add_config_path(str(demo_config))
    from examples.pipeline import DemoPipeline
    from luigi_creds.luigi import stop_agent

    try:
        result = luigi.build(
            [DemoPipeline(parts=PARTS, warehouse=state.database)],
            workers=WORKERS,
            local_scheduler=True,
            detailed_summary=True,
            log_level="WARNING",
            no_lock=True,
        )
    finally:
        stop_agent()
    print(textwrap.indent(result.summary_text.strip(), "  "), flush=True)
    return bool(result.scheduling_succeeded)


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the stack's children are stopped and its files deleted."""
    main_pid = os.getpid()

    def handler(signum: int, frame: object) -> None:
        # Forked Luigi workers inherit this handler; only the demo's own process unwinds.
        if os.getpid() == main_pid:
            raise SystemExit(128 + signum)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_demo() -> tuple[bool, subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """Stack up, pipeline, revoke, audit; the stack is torn down however this returns."""
    stack = DevStack(say=lambda line: print(f"  {line}", flush=True))
    with stack as state:
        print(f"  broker {state.broker_url}; grants: {', '.join(state.grants)}")
        print(
            f"  state dir {state.state_dir} (0700: AppRole files, audit, outputs; deleted at end)"
        )
        banner("a GitLab CI job's ID token (audience luigi-creds), exchanged once")
        # The token goes into this process's environment only (token_source = env:...).
        os.environ[TOKEN_VARIABLE] = mint_token(state.issuer_url, "gitlab", {})
        print(
            "  project data-platform/etl, ref main (protected), user alice; "
            f"token in ${TOKEN_VARIABLE}, never on disk"
        )
        banner(f"running the Luigi pipeline ({WORKERS} workers, {PARTS} extract parts)")
        ok = run_pipeline(state)
        os.environ.pop(TOKEN_VARIABLE, None)

        banner("operator: revoke the job's refresh session (ends its Vault tokens and leases)")
        broker_cli("sessions", "revoke", "--config", state.config, "--issuer", "dev")
        # A clean stop makes the broker sign a checkpoint over the records since the last one.
        stack.stop_broker()

        banner("luigi-creds-broker audit report")
        report = broker_cli("audit", "report", "--config", state.config, "--since", "1h")
        banner("luigi-creds-broker audit verify")
        verify = broker_cli("audit", "verify", "--config", state.config)
        banner("stopping moto, OpenBao and the issuer; deleting the state directory")
    return ok, report, verify


def main() -> int:
    _exit_on_sigterm()
    started = time.monotonic()
    print("luigi-creds demo: one CI token in, short-lived AWS and Vault credentials per task out")
    print(f"  (code from {Path(__file__).resolve().parents[1]})", flush=True)
    banner("starting the dev stack")
    try:
        ok, report, verify = run_demo()
    except (KeyboardInterrupt, SystemExit):
        print("\ndemo interrupted: the stack is stopped and its state dir deleted", flush=True)
        raise
    seconds = time.monotonic() - started
    good = ok and report.returncode == 0 and verify.returncode == 0
    print(f"\ndemo {'finished' if good else 'FAILED'} in {seconds:.0f} s", flush=True)
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())

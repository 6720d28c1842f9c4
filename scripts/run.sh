#!/usr/bin/env bash
# One entry point for a fresh machine. Creates or reuses the project venv (.venv, or
# $ANOMALOX_VENV), installs torch==2.13.0 and the other requirements, builds both Rust extensions
# into it (the core, anomalox._core, and the tch part, anomalox_tch in tch/), then:
#   scripts/run.sh demo    the main job: `anomalox demo` (PatchCore on the ELPV solar cells, HTML report)
#   scripts/run.sh test    the whole test suite: the linters (ruff, mypy, rustfmt, clippy), cargo test
#                          (kernels; the tch networks against libtorch) and pytest (the fresh-venv
#                          wheel tests in the background during the linters and cargo test);
#                          arguments go to pytest, which then runs all in the foreground
#   scripts/run.sh lint    only the linters
#   scripts/run.sh setup   only the set-up
set -euo pipefail
cd "$(dirname "$0")/.."
task="${1:-demo}"
shift || true

venv="${ANOMALOX_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv"
    python3 -m venv "$venv"
fi
# torch-sys's build script runs `python` from PATH: the venv must be active.
# shellcheck disable=SC1091
. "$venv/bin/activate"

stamp="$venv/.anomalox-requirements"
if ! cmp -s requirements-dev.txt "$stamp" 2>/dev/null; then
    echo "==> installing requirements (torch==2.13.0 is large: a minute or two)"
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -r requirements-dev.txt
    cp requirements-dev.txt "$stamp"
fi

# The tch crate builds in its own target folder: it compiles the core crate with other features
# (pyo3 without abi3), and sharing one folder would make each build recompile what the other just
# built. tests/test_wheel.py builds the wheels with the same folders, so they are cached.
export ANOMALOX_TCH_TARGET="$PWD/target/tch"
echo "==> building the extensions (release; a clean build takes a few minutes)"
maturin develop --release --quiet
(cd tch && CARGO_TARGET_DIR="$ANOMALOX_TCH_TARGET" LIBTORCH_USE_PYTORCH=1 maturin develop --release --quiet)

# Settings in pyproject.toml ([tool.ruff], [tool.mypy]). Clippy on each crate as `cargo test`
# builds it (default features) and as the wheels build it (core: feature `abi3`; tch: feature
# `python`, linked to the venv's libtorch; `--release` reuses the build scripts' outputs of the
# release builds above instead of compiling torch-sys's C++ again). rustfmt and clippy are rustup
# components of the machine's toolchain.
lint() {
    echo "==> ruff check, ruff format --check, mypy, cargo fmt --check, cargo clippy"
    ruff check python tests benches
    ruff format --check python tests benches
    mypy
    if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
        echo "scripts/run.sh: the Rust toolchain lacks rustfmt or clippy: rustup component add rustfmt clippy" >&2
        exit 1
    fi
    cargo fmt --all --check
    cargo clippy --quiet -p anomalox -- -D warnings
    cargo clippy --quiet --release -p anomalox --features abi3 -- -D warnings
    CARGO_TARGET_DIR="$ANOMALOX_TCH_TARGET" LIBTORCH_USE_PYTORCH=1 cargo clippy --quiet --release -p anomalox-tch -- -D warnings
    CARGO_TARGET_DIR="$ANOMALOX_TCH_TARGET" LIBTORCH_USE_PYTORCH=1 \
        cargo clippy --quiet --release -p anomalox-tch --features python -- -D warnings
}

case "$task" in
    setup) ;;
    demo) python -m anomalox demo "$@" ;;
    lint) lint ;;
    test)
        wheel_pid=""
        if [ $# -eq 0 ]; then
            # The fresh-venv wheel tests (tests/test_wheel.py) mostly wait on pip installing torch
            # builds into new venvs: they run in the background from here, alongside the linters
            # and cargo test, and their output is shown when they end.
            wheel_log="target/pytest-wheels.log"
            mkdir -p target
            echo "==> pytest tests/test_wheel.py, in the background (log: $wheel_log)"
            python -m pytest -q -rs -p no:cacheprovider --basetemp target/pytest-wheels tests/test_wheel.py \
                >"$wheel_log" 2>&1 &
            wheel_pid=$!
            trap 'kill "$wheel_pid" 2>/dev/null || true' EXIT
        fi
        lint
        echo "==> cargo test (kernels, no Python or libtorch; the tch networks against the venv's libtorch)"
        cargo test --quiet -p anomalox
        CARGO_TARGET_DIR="$ANOMALOX_TCH_TARGET" LIBTORCH_USE_PYTORCH=1 cargo test --quiet --release -p anomalox-tch
        if [ -z "$wheel_pid" ]; then
            echo "==> pytest"
            python -m pytest -q "$@"
        else
            # The rest of pytest runs alone (its timing tests see an idle machine).
            echo "==> pytest tests/test_wheel.py (started after the build; waiting for it)"
            if wait "$wheel_pid"; then status=0; else status=$?; fi
            trap - EXIT
            cat "$wheel_log"
            if [ "$status" -ne 0 ]; then exit "$status"; fi
            echo "==> pytest (all but tests/test_wheel.py)"
            python -m pytest -q --ignore=tests/test_wheel.py
        fi
        ;;
    *) echo "usage: scripts/run.sh [demo|test|lint|setup] [args...]" >&2; exit 2 ;;
esac

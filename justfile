# Recipes for contributors. `just` is not needed to build, run or test Cairn: each recipe is one
# plain command, shown here so that you can also type it yourself. `just --list` lists them.

# List the recipes.
default:
    @just --list

# Format every crate.
fmt:
    cargo fmt --all

# Lint every crate and target; warnings are errors, as in CI.
lint:
    cargo clippy --workspace --all-targets -- -D warnings

# The whole test suite (without PostgreSQL binaries the PostgreSQL tests are reported as ignored).
test:
    cargo test --workspace

# The real-process crash test: `cairn host` killed with SIGKILL at random moments under load, and stopped with SIGTERM.
crash:
    cargo test -p cairn-orchestrations --test process -- --nocapture

# Many hosts on one PostgreSQL database: killed and frozen hosts, work spread, a database restart, NOTIFY wake-ups.
scale:
    cargo test -p cairn-orchestrations --test scale_out -- --nocapture

# The long crash run (CAIRN_SOAK=1): more load, more kills, release build.
soak:
    CAIRN_SOAK=1 cargo test --release -p cairn-orchestrations --test process sigkill -- --nocapture

# The benchmark table (docs/performance.md): W1-W6 and the raw ceiling on SQLite and on a throwaway
# durable PostgreSQL cluster, 3 runs each (BENCH_RUNS), release build. ARGS go to every run.
bench *ARGS:
    bash .ci/bench {{ARGS}}

# The upgrade rate (docs/versioning.md): CAIRN_UPGRADE_BENCH (default 10,000) dehydrated version-1
# approvals moved to version 2 by `cairn upgrade`'s code, on SQLite and PostgreSQL, release build.
upgrade-bench:
    cargo test --release -p cairn-orchestrations --test versioning upgrade_rate -- --ignored --nocapture

# The console's page times with CONSOLE_INSTANCES (default 1,000,000) instances on SQLite and a
# throwaway PostgreSQL cluster (docs/console.md), release build.
console-bench:
    bash .ci/console-bench

# The console's screenshots in docs/console/ (docs/console.md), taken by its browser test.
screenshots:
    CAIRN_SCREENSHOTS="$PWD/docs/console" cargo test -p cairn-orchestrations --test console sqlite -- --nocapture

# Criterion micro-benchmarks of the transition path (decode, transition, encode, build the commit).
microbench:
    cargo bench -p cairn --bench transition

# Run the sample orchestrations on ./cairn.db with a progress bar and a summary.
demo:
    cargo run -- demo

# Add a migration to both backends with one version: migrations/{sqlite,postgres}/<UTC timestamp>_NAME.sql.
migration NAME:
    #!/usr/bin/env bash
    set -euo pipefail
    version="$(date -u +%Y%m%d%H%M%S)"
    for backend in sqlite postgres; do
        file="migrations/${backend}/${version}_{{NAME}}.sql"
        if [ -e "$file" ]; then
            echo "$file already exists" >&2
            exit 1
        fi
        printf -- '-- %s\n' "{{NAME}}" > "$file"
        echo "created $file"
    done

# What CI runs: format check, clippy, and the tests with PostgreSQL required.
ci:
    bash .ci/run

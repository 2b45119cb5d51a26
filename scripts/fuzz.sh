#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for the given number of seconds each (default 300), one after
# the other, and prints one summary line per target: seconds, executions, and whether it found
# a crash. Needs cargo-fuzz (`cargo install cargo-fuzz`) and the nightly toolchain, which
# libFuzzer's sanitizer flags require. A crashing input is kept in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh            # 300 s per target
#   scripts/fuzz.sh 60         # 60 s per target
#   scripts/fuzz.sh 60 login_token reading_payload
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-300}"
shift || true
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo "+$toolchain" fuzz list)
fi

cargo "+$toolchain" fuzz build
mkdir -p logs
failed=0
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    # The example configuration files are the config target's first inputs.
    if [ "$target" = config ]; then
        cp ../deploy/vigil.toml "corpus/$target/example.toml"
        cp ../deploy/container/vigil.toml "corpus/$target/container.toml"
    fi
    log="logs/$target.log"
    status=ok
    if ! cargo "+$toolchain" fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        status=CRASH
        failed=1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    echo "$target: ${seconds} s, ${runs:-?} executions, $status (log: fuzz/$log)"
done
exit "$failed"

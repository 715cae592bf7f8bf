#!/usr/bin/env bash
# Mutation testing of the suite with cargo-mutants (issue 23, "Measure the suite").
#
#   scripts/mutants.sh                 # every measured file, in order
#   scripts/mutants.sh conntrack       # one target (names below)
#   scripts/mutants.sh --list conntrack   # list the mutants, build nothing
#   MUTANTS_REV=<commit> scripts/mutants.sh conntrack   # measure a commit
#   MUTANTS_TEST_ARGS="--skip view_tests" scripts/mutants.sh config_slot
#       # extra test-binary arguments (e.g. leave new tests out to see what
#       # they add); MUTANTS_OUT=<dir> writes elsewhere than mutants.out/
#   MUTANTS_ARGS="-F is_vip" scripts/mutants.sh config_slot   # re-run some mutants
#
# Results go to mutants.out/<target>/mutants.out/ (caught.txt, missed.txt,
# unviable.txt, timeout.txt, outcomes.json); mutants.out/ is gitignored.
#
# Run narrowly: one source file per run, only the owning crate's unit tests
# (`--lib`), one job (`--in-place` implies it). Profile `mutants` (the dev
# profile under its own name, added to the copy's Cargo.toml): a mutant of
# shm-layout rebuilds in ~4 s there against ~15 s in release. The
# mutated tree is a copy of the sources under target/mutants-src (mutated in
# place there, never in the worktree), built into the worktree's own target/
# so that dependencies are not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

VERSION=27.1.0
if ! cargo mutants --version 2>/dev/null | grep -qF "$VERSION"; then
    cargo install --locked "cargo-mutants@$VERSION"
fi

list=()
if [ "${1:-}" = "--list" ]; then
    list=(--list)
    shift
fi

# name | package | file | per-mutant timeout (s) | test-binary filters
# A filter narrows the tests to the modules that use the file (checked with
# grep: conntrack, msgring and ring, the slow ones, use only its constants).
targets=(
    "conntrack|shm-layout|shm-layout/src/conntrack.rs|120|"
    "publish|shm-layout|shm-layout/src/publish.rs|30|publish:: region:: inspect:: switch_slot::"
    "config_slot|shm-layout|shm-layout/src/config_slot.rs|20|config_slot:: publish:: region:: inspect::"
    "routing_slot|shm-layout|shm-layout/src/routing_slot.rs|120|"
    "switchd-decide|switchd|switchd/src/filter/decide.rs|180|"
    "switchd-state|switchd|switchd/src/filter/state.rs|180|"
    "controld-loading|controld|controld/src/loading.rs|180|"
    "controld-publisher|controld|controld/src/publisher.rs|180|"
    # Not yet measured (tests being written there): controld/src/gc.rs,
    # controld/src/supervisor.rs. Add them here as
    #   "controld-gc|controld|controld/src/gc.rs|180|"
)

want=("$@")
selected() {
    [ ${#want[@]} -eq 0 ] && return 0
    local w
    for w in "${want[@]}"; do [ "$w" = "$1" ] && return 0; done
    return 1
}

# A private copy of the sources: cargo-mutants edits it in place.
work="${MUTANTS_WORK:-$root/target/mutants-src}"
profile="${MUTANTS_PROFILE:-mutants}"
sync_copy() {
    mkdir -p "$work"
    find "$work" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
    if [ -n "${MUTANTS_REV:-}" ]; then
        # Measure a commit instead of the working tree (e.g. before new tests).
        git -C "$root" archive --format=tar "$MUTANTS_REV" | tar -C "$work" -xf -
    else
        tar -C "$root" --exclude=./target --exclude='./target-*' --exclude=./.git \
            --exclude=./mutants.out --exclude=./fuzz/target -cf - . | tar -C "$work" -xf -
    fi
    # A profile of its own: the copy's crates have the same artifact names as
    # the worktree's (cargo's hash ignores the workspace path), so a build in
    # the worktree in the same profile would be taken as fresh for a mutant,
    # or a mutant's build as fresh for the worktree.
    # Two runs at once (MUTANTS_WORK) need two profile names, for the same
    # reason: MUTANTS_PROFILE=mutants2.
    case $profile in
        dev | release | test | bench) ;;
        *) printf '\n[profile.%s]\ninherits = "dev"\n' "$profile" >>"$work/Cargo.toml" ;;
    esac
}

for t in "${targets[@]}"; do
    IFS='|' read -r name pkg file timeout extra <<<"$t"
    selected "$name" || continue
    sync_copy
    stamp=$(mktemp)
    out="$root/${MUTANTS_OUT:-mutants.out}/$name"
    mkdir -p "$out"
    echo "== $name: $file (tests: -p $pkg --lib)"
    # --baseline=skip: the unmutated tests are run by the normal suite; a
    # fixed --timeout replaces the one cargo-mutants would derive from it.
    # cargo-mutants exits 2 when mutants are missed, 3 on timeouts: keep going.
    (
        cd "$work"
        CARGO_TARGET_DIR="$root/target" cargo mutants "${list[@]}" \
            --in-place --no-shuffle \
            --baseline=skip --timeout "$timeout" --build-timeout 600 \
            --profile "$profile" \
            --package "$pkg" --file "$file" \
            --test-package "$pkg" \
            --output "$out" ${MUTANTS_ARGS:-} \
            -- --lib -- ${extra} ${MUTANTS_TEST_ARGS:-}
    ) || echo "== $name: cargo-mutants exit $?"
    # A test killed at the timeout cannot remove the region it created
    # (/dev/shm/switchyard.<test>-<pid>: shm-layout's t-*, controld's ap-*, gc-*...): remove those of this run whose
    # process is gone.
    find /dev/shm -maxdepth 1 -name 'switchyard.*-[0-9]*' -newer "$stamp" 2>/dev/null |
        while read -r f; do
            pid=${f##*-}
            case $pid in '' | *[!0-9]*) continue ;; esac
            kill -0 "$pid" 2>/dev/null || rm -f "$f"
        done
    rm -f "$stamp"
done

#!/usr/bin/env bash
# Set up .venv for this clone; prints its path on the last line.
#
# The heavy dependencies (torch, torchvision, ...) live in ONE shared virtual environment
# outside the clone, keyed by a hash of requirements/*.txt and the Python version, under
# ${NORMBENCH_VENV_CACHE:-~/.cache/normbench/venvs}; a missing one is built from scratch here.
# The clone's own .venv is a thin venv that sees those packages through a .pth file and holds
# an editable install of this checkout (so two clones never import each other's code).
#   NORMBENCH_EXTRAS="ray"  also installs requirements/ray.txt into the shared venv.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
cache=${NORMBENCH_VENV_CACHE:-$HOME/.cache/normbench/venvs}
reqs=("$repo/requirements/core.txt" "$repo/requirements/dev.txt")
for extra in ${NORMBENCH_EXTRAS:-}; do reqs+=("$repo/requirements/$extra.txt"); done
key=$( (cat "${reqs[@]}"; "$py" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)
deps="$cache/deps-$key"
mkdir -p "$cache"

exec 9>"$cache/.lock-$key"
flock 9
if [ ! -f "$deps/.complete" ]; then
    echo "normbench: building the shared dependency venv $deps (first time only; a few minutes)" >&2
    rm -rf "$deps"
    "$py" -m venv "$deps"
    req_args=(); for r in "${reqs[@]}"; do req_args+=(-r "$r"); done
    "$deps/bin/python" -m pip install --quiet --disable-pip-version-check "${req_args[@]}" >&2
    touch "$deps/.complete"
fi
flock -u 9

site=$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
venv="$repo/.venv"
if [ ! -f "$venv/.normbench-deps" ] || [ "$(cat "$venv/.normbench-deps")" != "$deps" ]; then
    echo "normbench: setting up $venv" >&2
    rm -rf "$venv"
    "$py" -m venv --without-pip "$venv"
    vsite=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$site" > "$vsite/_normbench_shared_deps.pth"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$repo" >&2
    echo "$deps" > "$venv/.normbench-deps"
fi
# the shared venv's command-line tools, run by this venv's python (so that Ray's workers import
# this checkout's normbench): tensorboard and, with the ray extra, ray
for tool in tensorboard:tensorboard.main ray:ray.scripts.scripts; do
    name=${tool%%:*} module=${tool#*:}
    if [ ! -x "$venv/bin/$name" ] && "$venv/bin/python" -c "import importlib.util, sys; \
            sys.exit(importlib.util.find_spec('${module%%.*}') is None)" 2>/dev/null; then
        printf '#!/usr/bin/env bash\nexec "%s" -m %s "$@"\n' "$venv/bin/python" "$module" > "$venv/bin/$name"
        chmod +x "$venv/bin/$name"
    fi
done
echo "$venv"

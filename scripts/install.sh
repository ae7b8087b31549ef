#!/usr/bin/env bash
# Install edge-agent as a systemd service on a Debian-family device (Debian, Raspberry Pi
# OS, Ubuntu). Idempotent: run it again to upgrade; it changes only what differs.
#
#   sudo scripts/install.sh [--device-id ID] [--broker-host HOST] [--broker-port PORT]
#                           [--manifest PATH_OR_URL] [--password-file FILE] [--fleet] [--no-start]
#                           (--signing-key BASE64 | --allow-unsigned) [--wheels-from URL]
#   sudo scripts/install.sh --uninstall [--purge]
#   scripts/install.sh --print-config [options]   show the agent.yaml a first install writes
#
# What it makes:
#   /opt/edge-agent/src     a copy of this source tree (what the venv was built from)
#   /opt/edge-agent/venv    virtual environment, llama.cpp built for this hardware (scripts/setup)
#   /opt/edge-agent/releases  the agent's own (its user owns it): `current`, the venv the unit
#                           starts (this venv after every install that changed something), and
#                           the versions the `upgrade` command installed beside it
#   /etc/edge-agent/agent.yaml        from systemd/agent.yaml.example, first install only,
#                                     never overwritten (the options above only fill it then)
#   /etc/edge-agent/mqtt-password     root-only; empty until you put the broker password in
#   /etc/systemd/system/edge-agent.service (+ edge-fleet.service with --fleet)
#   the system user edge-agent, in the video/render groups where they exist (GPU nodes);
#   with --fleet also edge-fleet: the controller runs as its own user, so a compromised
#   agent can neither read fleet.db (/var/lib/edge-fleet, 0700) nor signal the controller
#   /opt/edge-agent is root's (root:root, nothing group- or world-writable), whoever owns the
#   checkout: root runs what is in it. releases/ alone is the agent's; root runs nothing in it.
#
# --signing-key pins the fleet controller's Ed25519 public key (`edge-agent fleet signing-key`
# on the controller, or its GET /api/signing-key) as signing.public_key: the agent then loads
# only manifests the controller signed. A first install refuses to go without one unless
# --allow-unsigned is given, which writes signing.allow_unsigned: true (shown in meta).
#
# --wheels-from URL takes llama.cpp from the fleet controller's wheelhouse (README: Updating the
# fleet) when it hosts a wheel built for this hardware class: no compiler is installed and
# nothing is compiled. The wheel index must carry the controller's signature by the pinned key
# (--signing-key, or signing.public_key of an existing agent.yaml); there is no unsigned way.
# No wheel for this device, or no controller: the toolchain is installed and llama.cpp compiled,
# as without the option. A wheel or index that fails its sha256 or signature stops the install
# before the venv or the units change: the running agent keeps running what it had.
#
# --uninstall removes the service, the venv and the state, and keeps /etc/edge-agent and
# the downloaded models (/var/cache/edge-agent); --purge removes those and the user too.
#
# Environment: EDGE_AGENT_CACHE (where setup keeps built llama.cpp wheels, default
# /root/.cache/edge-agent), PIP_* (e.g. PIP_FIND_LINKS for an offline wheelhouse).
set -euo pipefail
# Whatever sudo passed on: what this script creates is never group- or world-writable.
umask 022

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=/opt/edge-agent
config_dir=/etc/edge-agent
unit_dir=/etc/systemd/system
user=edge-agent
fleet_user=edge-fleet

say() { printf 'install: %s\n' "$*" >&2; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 2; }

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

action=install
device_id="" broker_host="" broker_port="" manifest="" password_file="" signing_key="" allow_unsigned=0
wheels_from=""
fleet=0 start=1 purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device-id) device_id=${2:?--device-id needs a value}; shift 2 ;;
    --broker-host) broker_host=${2:?--broker-host needs a value}; shift 2 ;;
    --broker-port) broker_port=${2:?--broker-port needs a value}; shift 2 ;;
    --manifest) manifest=${2:?--manifest needs a value}; shift 2 ;;
    --password-file) password_file=${2:?--password-file needs a value}; shift 2 ;;
    --signing-key) signing_key=${2:?--signing-key needs a value}; shift 2 ;;
    --allow-unsigned) allow_unsigned=1; shift ;;
    --wheels-from) wheels_from=${2:?--wheels-from needs a URL}; shift 2 ;;
    --fleet) fleet=1; shift ;;
    --no-start) start=0; shift ;;
    --uninstall) action=uninstall; shift ;;
    --purge) purge=1; shift ;;
    --print-config) action=print-config; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

# The device id becomes an MQTT client id, username and topic level: no wildcards, no '/'.
if [ -n "$device_id" ] && ! [[ "$device_id" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]]; then
  die "--device-id '$device_id': use letters, digits, '.', '_', '-' (at most 64)"
fi
# The contract's topic words (agent/mqtt/topics.py RESERVED_DEVICE_IDS): a device named `all`
# would own edge/v1/all/cmd, which every device obeys, and one named `pool` the pool prompts.
case "$device_id" in
  all|pool|status|meta|telemetry|prompt|cmd|result|events|reply)
    die "--device-id '$device_id' is a reserved topic word of the MQTT contract; choose another id" ;;
esac
if [ -n "$broker_host" ] && ! [[ "$broker_host" =~ ^[A-Za-z0-9.:-]+$ ]]; then
  die "--broker-host '$broker_host' is not a host name or address"
fi
if [ -n "$broker_port" ] && ! { [[ "$broker_port" =~ ^[0-9]+$ ]] && [ "$broker_port" -ge 1 ] && [ "$broker_port" -le 65535 ]; }; then
  die "--broker-port '$broker_port' is not a port number (1-65535)"
fi
case "$manifest" in *$'\n'*) die "--manifest must be one line" ;; esac
# Signing: base64 of a raw 32-byte Ed25519 key is 43 characters and one '='.
if [ -n "$signing_key" ] && ! [[ "$signing_key" =~ ^[A-Za-z0-9+/]{43}=$ ]]; then
  die "--signing-key: expected the controller's Ed25519 public key, base64 (44 characters)"
fi
[ -n "$signing_key" ] && [ "$allow_unsigned" = 1 ] && die "--signing-key and --allow-unsigned exclude each other"
if [ -n "$wheels_from" ] && ! [[ "$wheels_from" =~ ^https?://[A-Za-z0-9.:@%/_~+-]+$ ]]; then
  die "--wheels-from '$wheels_from' is not an http(s) URL of a controller"
fi
if [ "$action" != uninstall ] && [ -z "$signing_key" ] && [ "$allow_unsigned" = 0 ] \
    && { [ "$action" = print-config ] || [ ! -e "$config_dir/agent.yaml" ]; }; then
  die "give --signing-key BASE64 (the controller's key: edge-agent fleet signing-key) so only signed manifests load, or --allow-unsigned"
fi

# agent.yaml for a first install: the commented template with the given options filled in.
render_config() {
  local yaml_manifest
  yaml_manifest=null
  if [ -n "$manifest" ]; then
    # A double-quoted YAML scalar: only backslash and double quote need escaping.
    yaml_manifest="\"$(printf '%s' "$manifest" | sed 's/\\/\\\\/g; s/"/\\"/g')\""
  fi
  local sed_script=()
  [ -n "$device_id" ] && sed_script+=(-e "s|^#device_id: .*|device_id: $device_id|")
  [ -n "$broker_host" ] && sed_script+=(-e "s|^  host: .*|  host: $broker_host|")
  [ -n "$broker_port" ] && sed_script+=(-e "s|^  port: [0-9]*|  port: $broker_port|")
  [ -n "$manifest" ] && sed_script+=(-e "s|^  manifest: null|  manifest: $(printf '%s' "$yaml_manifest" | sed 's/[\\|&]/\\&/g')|")
  # base64 has '/' and '+': fine inside a '|'-delimited sed expression and a YAML double quote.
  [ -n "$signing_key" ] && sed_script+=(-e "s|^  public_key: null|  public_key: \"$signing_key\"|")
  [ "$allow_unsigned" = 1 ] && sed_script+=(-e "s|^  # allow_unsigned: false.*|  allow_unsigned: true|")
  sed "${sed_script[@]:-}" "$repo/systemd/agent.yaml.example"
}

if [ "$action" = print-config ]; then
  render_config
  exit 0
fi

[ "$(id -u)" = 0 ] || die "run as root (sudo $0 ...)"
command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ] \
  || die "systemd is not running here; edge-agent installs as a systemd service"

uninstall() {
  say "stopping and removing the services"
  local unit
  for unit in edge-agent edge-fleet; do
    if [ -e "$unit_dir/$unit.service" ]; then
      systemctl disable --now "$unit.service" >/dev/null 2>&1 || true
      rm -f "$unit_dir/$unit.service" "$unit_dir/$unit.service.d/50-install-gpu.conf"
      rmdir "$unit_dir/$unit.service.d" 2>/dev/null || true
    fi
  done
  systemctl daemon-reload
  systemctl reset-failed edge-agent.service edge-fleet.service >/dev/null 2>&1 || true
  rm -rf "$prefix" /var/lib/edge-agent /var/lib/edge-fleet /var/log/edge-agent
  if [ "$purge" = 1 ]; then
    say "purging configuration, models and the user $user"
    rm -rf "$config_dir" /var/cache/edge-agent /var/cache/edge-fleet
    for account in "$user" "$fleet_user"; do
      if getent passwd "$account" >/dev/null; then userdel "$account"; fi
      if getent group "$account" >/dev/null; then groupdel "$account"; fi
    done
  else
    say "kept $config_dir and /var/cache/edge-agent (models); --purge removes them"
  fi
}

if [ "$action" = uninstall ]; then
  uninstall
  exit 0
fi

# --- prerequisites -------------------------------------------------------------------
python=${PYTHON:-python3}
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "please install: $*"
  say "installing $* (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}
command -v "$python" >/dev/null 2>&1 || apt_install python3
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$("$python" -V 2>&1) is too old: edge-agent needs Python >= 3.10 (Debian 12 / Raspberry Pi OS bookworm or newer)"
# Debian splits venv and ensurepip out of python3.
"$python" -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_install python3-venv
cache=${EDGE_AGENT_CACHE:-/root/.cache/edge-agent}
# The wheelhouse's index is checked with the key manifests are: given now or pinned before.
wheels_key=$signing_key
if [ -n "$wheels_from" ] && [ -z "$wheels_key" ] && [ -e "$config_dir/agent.yaml" ]; then
  wheels_key=$(sed -n 's/^  public_key: "\{0,1\}\([A-Za-z0-9+/]\{43\}=\)"\{0,1\} *$/\1/p' \
    "$config_dir/agent.yaml" | head -n1)
fi
[ -z "$wheels_from" ] || [ -n "$wheels_key" ] \
  || die "--wheels-from needs the controller's key: --signing-key BASE64 (an unsigned wheel index is never used)"

# --- the system user ------------------------------------------------------------------
if ! getent passwd "$user" >/dev/null; then
  say "creating system user $user"
  useradd --system --user-group --home-dir /var/lib/edge-agent --no-create-home \
    --shell /usr/sbin/nologin --comment "edge-agent daemon" "$user"
fi
if [ "$fleet" = 1 ] && ! getent passwd "$fleet_user" >/dev/null; then
  say "creating system user $fleet_user"
  useradd --system --user-group --home-dir /var/lib/edge-fleet --no-create-home \
    --shell /usr/sbin/nologin --comment "edge-agent fleet controller" "$fleet_user"
fi
# GPU device nodes are group-accessible (video: /dev/nvidia*, Jetson; render: /dev/dri, /dev/kfd).
for group in video render; do
  if getent group "$group" >/dev/null && ! id -nG "$user" | tr ' ' '\n' | grep -qx "$group"; then
    usermod -aG "$group" "$user"
  fi
done

# --- source and virtual environment ---------------------------------------------------
# What a running service was started from; when it changes, an upgrade restarts it.
installed_digest() {
  { cat "$unit_dir"/edge-agent.service "$unit_dir"/edge-agent.service.d/50-install-gpu.conf \
      "$unit_dir"/edge-fleet.service "$prefix/venv/.edge-agent-setup" 2>/dev/null || true; } | sha256sum
}
units_before=$(installed_digest)
# setup builds from a copy: a regular install writes build files into the source tree,
# and the checkout it runs from may be read-only.
if [ "$repo" != "$prefix/src" ]; then
  say "copying the source to $prefix/src"
  install -d -m 0755 -o root -g root "$prefix"
  rm -rf "$prefix/src.new"
  mkdir "$prefix/src.new"
  # Extracted as root, tar would keep the checkout's owner and modes: a user who owns (or
  # can write) a file root later runs would own root. Root's files, the umask's modes.
  tar -C "$repo" --exclude=__pycache__ --exclude='*.egg-info' --exclude=build \
    -cf - pyproject.toml README.md agent profiles scripts systemd \
    | tar -C "$prefix/src.new" --no-same-owner --no-same-permissions -xf -
  rm -rf "$prefix/src"
  mv "$prefix/src.new" "$prefix/src"
fi
# llama.cpp is compiled on the device unless setup has a wheel for it: in its cache, or fetched
# (and verified) from the controller's wheelhouse first, before any toolchain is installed.
if [ -n "$wheels_from" ]; then
  EDGE_AGENT_VENV="$prefix/venv" EDGE_AGENT_CACHE="$cache" PYTHON="$python" \
    "$prefix/src/scripts/setup" --wheels-from "$wheels_from" --signing-key "$wheels_key" --fetch-only \
    || die "setup --wheels-from $wheels_from failed (see above): nothing was installed; the running agent is unchanged"
fi
if ! ls "$cache"/wheels/llama-cpp-python-*/llama_cpp_python-*.whl >/dev/null 2>&1 \
    && ! command -v g++ >/dev/null 2>&1; then
  apt_install build-essential cmake
fi
extras=signing
[ "$fleet" = 1 ] && extras=fleet,signing
EDGE_AGENT_VENV="$prefix/venv" EDGE_AGENT_EDITABLE=0 EDGE_AGENT_CACHE="$cache" EXTRAS="$extras" \
  PYTHON="$python" "$prefix/src/scripts/setup"
# Also for a tree left by an older install.sh (which kept the checkout's owner), and for the
# venv: everything root executes belongs to root and only root can change it.
chown root:root "$prefix"
chmod go-w "$prefix"
chown -R root:root "$prefix/src" "$prefix/venv"
chmod -R go-w "$prefix/src" "$prefix/venv"

# --- configuration --------------------------------------------------------------------
install -d -m 0755 "$config_dir"
if [ ! -e "$config_dir/agent.yaml" ]; then
  say "writing $config_dir/agent.yaml (edit it, then: systemctl restart edge-agent)"
  render_config > "$config_dir/agent.yaml.new"
  chown "root:$user" "$config_dir/agent.yaml.new"
  chmod 0640 "$config_dir/agent.yaml.new"
  mv "$config_dir/agent.yaml.new" "$config_dir/agent.yaml"
else
  [ -z "$device_id$broker_host$broker_port$manifest$signing_key" ] \
    || say "$config_dir/agent.yaml exists: left as it is (the options only fill a new one)"
fi
# LoadCredential= needs the file to exist; an empty one means "no password".
if [ -n "$password_file" ]; then
  [ -r "$password_file" ] || die "--password-file $password_file cannot be read"
  install -m 0600 -o root -g root "$password_file" "$config_dir/mqtt-password"
elif [ ! -e "$config_dir/mqtt-password" ]; then
  install -m 0600 -o root -g root /dev/null "$config_dir/mqtt-password"
fi

# --- units ----------------------------------------------------------------------------
install -m 0644 "$repo/systemd/edge-agent.service" "$unit_dir/edge-agent.service"
# The CUDA driver JIT-compiles kernels into writable+executable memory.
if ls /dev/nvidiactl /dev/nvhost-ctrl-gpu >/dev/null 2>&1; then
  install -d -m 0755 "$unit_dir/edge-agent.service.d"
  printf '# Written by scripts/install.sh: NVIDIA GPU present (CUDA JIT needs W+X pages).\n[Service]\nMemoryDenyWriteExecute=no\n' \
    > "$unit_dir/edge-agent.service.d/50-install-gpu.conf"
fi
if [ "$fleet" = 1 ]; then
  install -m 0644 "$repo/systemd/edge-fleet.service" "$unit_dir/edge-fleet.service"
  [ -e "$config_dir/fleet-mqtt-password" ] \
    || install -m 0600 -o root -g root /dev/null "$config_dir/fleet-mqtt-password"
fi
units_after=$(installed_digest)

# --- agent releases (the upgrade command, agent/upgrade.py) ------------------------------
# The agent installs the versions the controller sends it beside this one, in a directory of
# its own (the unit's only ReadWritePaths= under /opt); the unit starts releases/current.
# An install that changed something makes this venv current again: the admin's choice wins.
releases=$prefix/releases
install -d -m 0755 -o "$user" -g "$user" "$releases"
ln -sfn "$prefix/venv" "$releases/installed"
if [ ! -L "$releases/current" ] || [ "$units_before" != "$units_after" ]; then
  ln -sfn "$prefix/venv" "$releases/.current.new"
  mv -T "$releases/.current.new" "$releases/current"
  rm -f "$releases/previous" "$releases/trial.json"
fi
systemctl daemon-reload

services=(edge-agent.service)
if [ "$fleet" = 1 ]; then
  if [ -e "$config_dir/fleet.yaml" ]; then
    services+=(edge-fleet.service)
  else
    say "edge-fleet.service installed but not started: write $config_dir/fleet.yaml first" \
      "(readable by the controller: chown root:$fleet_user, chmod 0640)"
  fi
fi
systemctl enable --quiet "${services[@]}"
if [ "$start" = 1 ]; then
  for service in "${services[@]}"; do
    # An upgrade (new code or unit) restarts a running service; an unchanged one is left alone.
    if systemctl is-active --quiet "$service" && [ "$units_before" != "$units_after" ]; then
      say "restarting $service (upgraded)"
      systemctl restart --no-block "$service"
    else
      systemctl start --no-block "$service"
    fi
  done
  say "started; follow it with: journalctl -u edge-agent -f   (state: systemctl status edge-agent)"
else
  say "installed and enabled, not started (--no-start)"
fi

#!/bin/sh
# Inside a pristine test VM (tests/vmharness.py, Recipe.for_release(node=False)): the first part
# of the "deb" scenario, in shell because the image has no python3 before the package brings it.
# Run by the image's netacct-vm-run unit as ``guest_deb.sh IN OUT``. It keeps the scenario's own
# test tools (tests/vm/guest_deb.py, tests/topology.py, tests/traffic.py: stdlib Python, no
# part of the product), then REMOVES the checkout (IN/src): nothing of the project is on this
# system but what the package installs. It lists the file system (before.txt), installs the
# older .deb with apt from the image's apt cache (offline: its Depends must be there), and
# hands over to guest_deb.py, run by the Debian python3 the package's Depends brought.
set -eu
in=$1
out=$2
tools=/var/lib/netacct-vm/tools
mkdir -p "$tools" "$out/logs"
cp "$in/src/tests/vm/guest_deb.py" "$in/src/tests/topology.py" "$in/src/tests/traffic.py" "$tools/"
rm -rf "$in/src"
echo "NETACCT-VM: deb: checkout removed" >/dev/console
export DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
# A test tool, not a Depends: topology.py turns segmentation offloads off with ethtool.
apt-get install -y -q --no-install-recommends --no-download ethtool >"$out/logs/apt-ethtool.log" 2>&1
# The file system as a pristine node has it. /run, /proc, /sys, /dev are other file systems
# (-xdev); /var/lib/netacct-vm is this harness's own.
snapshot() {
    find / -xdev -path /var/lib/netacct-vm -prune -o -print | sort >"$1"
}
snapshot "$out/before.txt"
dpkg-query -W -f '${Package}\n' | sort >"$out/packages-before.txt"
old=$(ls "$in"/debs/*old*.deb)
echo "NETACCT-VM: deb: installing $old" >/dev/console
# No --no-download here: with it apt 2.6 does not resolve a local .deb's path ("Internal
# Error, Pathname to install is not absolute"). The VM has no network: what is not in the
# image's apt cache fails to download, so the Depends are still proven to come from there.
apt-get install -y --no-install-recommends "$old" >"$out/logs/apt-install-old.log" 2>&1 || {
    echo "{\"ok\": false, \"error\": \"apt-get install of the older package failed (see logs/apt-install-old.log)\"}" >"$out/result.json"
    exit 1
}
exec /usr/bin/python3 "$tools/guest_deb.py" "$in" "$out"

#!/bin/sh
# mmdebstrap customize hook: settle the base system (runs once per cached base).
set -eu
root="$1"

# The raspi-firmware kernel hook only copies kernel, initrd, DTBs and writes cmdline.txt
# when it believes it runs from dpkg's configure step and can read /proc: run it again
# with both, now that every package is configured.
kver="$(ls "$root/lib/modules" | sort -V | tail -n1)"
mountpoint -q "$root/proc" || { mount -t proc proc "$root/proc"; trap 'umount "$root/proc"' EXIT; }
chroot "$root" env DEB_MAINT_PARAMS=configure /etc/kernel/postinst.d/z50-raspi-firmware "$kver"
test -s "$root/boot/firmware/cmdline.txt" || { echo "raspi-firmware wrote no cmdline.txt" >&2; exit 1; }

# The service account: no login, no home of its own but its state directory.
# bluetooth: BlueZ's D-Bus policy lets this group talk to bluetoothd (BLE scanning).
chroot "$root" useradd --system --user-group --home-dir /var/lib/siteward --no-create-home \
    --shell /usr/sbin/nologin siteward
chroot "$root" usermod -a -G bluetooth siteward

# Every card must get its own machine id on first boot (also makes ConditionFirstBoot work).
echo uninitialized > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# mmdebstrap leaves the build host's name and resolver in the tree.
echo siteward > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tsiteward\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
# No password login at all: the appliance is run from its web UI.
chroot "$root" passwd --lock root >/dev/null

systemctl --root="$root" enable systemd-networkd.service systemd-resolved.service systemd-timesyncd.service
# Nothing on the appliance waits for "network online": the local broker and web UI must
# come up on a site with no uplink, and with Wi-Fi configured for an absent network this
# unit would hold boot for two minutes.
systemctl --root="$root" mask systemd-networkd-wait-online.service

#!/bin/sh
# Build the kmsgate .deb with Debian's own tools only (dpkg-deb; no network, no debhelper, no nfpm).
#
#   packaging/build-deb.sh BIN VERSION        (make deb: packaging/build-deb.sh bin/kmsgate $(VERSION))
#   packaging/build-deb.sh --print-version VERSION     (only print the Debian version)
#
# VERSION is whatever `git describe --tags --always --dirty` printed; it is turned into a valid
# Debian version (v1.2.3 -> 1.2.3, v1.2.3-4-gabc1234-dirty -> 1.2.3+4.gabc1234.dirty,
# 18b7711-dirty -> 0.0.0~git18b7711.dirty). The package lands in $DIST_DIR (default dist/) as
# kmsgate_<version>_<arch>.deb, its path printed on stdout.
#
# Environment: DIST_DIR (output dir), DEB_ARCH (override the architecture read from BIN's ELF
# header), DEB_MAINTAINER, DEB_COMPRESS (dpkg-deb -Z: xz by default; the tests use gzip).
set -eu

usage() { echo "usage: $0 BIN VERSION | $0 --print-version VERSION" >&2; exit 2; }
[ $# -eq 2 ] || usage
BIN=$1
RAW_VERSION=$2
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
DIST_DIR=${DIST_DIR:-$REPO/dist}
MAINTAINER=${DEB_MAINTAINER:-kmsgate maintainers <kmsgate@localhost>}

# --- Debian version ------------------------------------------------------------------------------
debian_version() {
	v=${1#v}
	# A bare abbreviated hash (git describe --always, no tag yet), possibly -dirty. Checked first:
	# a hash may start with a digit.
	if printf '%s' "$1" | grep -Eq '^[0-9a-f]{7,40}(-dirty)?$'; then
		printf '0.0.0~git%s\n' "$(printf '%s' "$1" | sed 's/-dirty$/.dirty/')"
		return
	fi
	case "$v" in
	[0-9]*)
		# <tag>-<n>-g<hash>[-dirty]: commits after a tag sort after the tag.
		v=$(printf '%s' "$v" | sed -E 's/-([0-9]+)-(g[0-9a-f]+)/+\1.\2/')
		;;
	*)
		# A word such as "dev" or "unknown".
		v="0.0.0~$v"
		;;
	esac
	# Remaining hyphens would start a Debian revision (-dirty, -rc1): use "." and "~" instead.
	v=$(printf '%s' "$v" | sed -E 's/-dirty$/.dirty/; s/-(rc|alpha|beta|pre)/~\1/g; s/-/./g; s/[^A-Za-z0-9.+~]/./g')
	printf '%s\n' "$v"
}
VERSION=$(debian_version "$RAW_VERSION")
if ! printf '%s' "$VERSION" | grep -Eq '^[0-9][A-Za-z0-9.+~]*$' ||
	! dpkg --validate-version "$VERSION" 2>/dev/null; then
	echo "$0: cannot make a Debian version out of '$RAW_VERSION' (got '$VERSION')" >&2
	exit 1
fi
if [ "$BIN" = --print-version ]; then
	printf '%s\n' "$VERSION"
	exit 0
fi

[ -f "$BIN" ] && [ -x "$BIN" ] || { echo "$0: $BIN is not an executable file (run make build)" >&2; exit 1; }
command -v dpkg-deb >/dev/null || { echo "$0: dpkg-deb not found" >&2; exit 1; }

# --- Architecture, from the binary itself (cross builds), else the host ---------------------------
elf_arch() {
	[ "$(head -c4 "$1" | od -An -c | tr -d ' ')" = '177ELF' ] || return 1
	class=$(od -An -tu1 -j4 -N1 "$1" | tr -d ' ')  # 1 = 32-bit, 2 = 64-bit
	data=$(od -An -tu1 -j5 -N1 "$1" | tr -d ' ')   # 1 = little-endian, 2 = big-endian
	# e_machine: 2 bytes at offset 18, in the file's byte order.
	if [ "$data" = 1 ]; then
		m=$(od -An -tu1 -j18 -N2 "$1" | awk '{print $1 + 256 * $2}')
	else
		m=$(od -An -tu1 -j18 -N2 "$1" | awk '{print 256 * $1 + $2}')
	fi
	case "$class/$data/$m" in
	2/1/62) echo amd64 ;;
	2/1/183) echo arm64 ;;
	1/1/40) echo armhf ;;
	1/1/3) echo i386 ;;
	2/1/243) echo riscv64 ;;
	2/1/21) echo ppc64el ;;
	2/2/22) echo s390x ;;
	*) return 1 ;;
	esac
}
if [ -n "${DEB_ARCH:-}" ]; then
	ARCH=$DEB_ARCH
elif ARCH=$(elf_arch "$BIN"); then
	:
else
	ARCH=$(dpkg --print-architecture)
	echo "$0: warning: $BIN is not a recognised ELF binary; packaging it as $ARCH" >&2
fi

# glibc baseline: the highest GLIBC_x.y symbol version the binary needs (cgo, dlopen).
GLIBC_MIN=$(LC_ALL=C grep -ao 'GLIBC_2\.[0-9]*' "$BIN" 2>/dev/null | sed 's/GLIBC_//' | sort -t. -k1,1n -k2,2n | tail -n1 || true)
if [ -n "$GLIBC_MIN" ]; then
	LIBC_DEP="libc6 (>= $GLIBC_MIN)"
else
	LIBC_DEP="libc6"
fi

# --- Staging tree ----------------------------------------------------------------------------------
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/kmsgate-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT INT TERM
ROOT=$STAGE/root
umask 022

install -d -m 0755 "$ROOT/DEBIAN" "$ROOT/usr/bin" "$ROOT/lib/systemd/system" \
	"$ROOT/etc/kmsgate" "$ROOT/etc/default" \
	"$ROOT/usr/share/doc/kmsgate/examples/dropins"
install -m 0755 "$BIN" "$ROOT/usr/bin/kmsgate"
install -m 0644 "$REPO/systemd/kmsgate.service" "$ROOT/lib/systemd/system/kmsgate.service"
for f in "$REPO"/systemd/dropins/*.conf; do
	install -m 0644 "$f" "$ROOT/usr/share/doc/kmsgate/examples/dropins/"
done
for f in "$HERE"/examples/*; do
	install -m 0644 "$f" "$ROOT/usr/share/doc/kmsgate/examples/"
done
install -m 0644 "$HERE/README.Debian" "$ROOT/usr/share/doc/kmsgate/README.Debian"
# Group and final mode of kms.json come from the postinst (dpkg-statoverride root:kmsgate 0640):
# the group does not exist when dpkg unpacks the file.
install -m 0640 "$HERE/etc/kms.json" "$ROOT/etc/kmsgate/kms.json"
install -m 0640 "$HERE/etc/default-kmsgate" "$ROOT/etc/default/kmsgate"

for s in postinst prerm postrm; do
	install -m 0755 "$HERE/deb/$s" "$ROOT/DEBIAN/$s"
done
printf '%s\n' /etc/kmsgate/kms.json /etc/default/kmsgate > "$ROOT/DEBIAN/conffiles"
chmod 0644 "$ROOT/DEBIAN/conffiles"

INSTALLED_SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
cat > "$ROOT/DEBIAN/control" <<CONTROL
Package: kmsgate
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $INSTALLED_SIZE
Depends: $LIBC_DEP, passwd
Recommends: softhsm2, opensc
Section: utils
Priority: optional
Description: PKCS#11-first HSM signing gateway
 kmsgate is a single-binary signing gateway that gives issuers of digital
 credentials one HTTP signing API over PKCS#11 HSMs (loaded with dlopen),
 HashiCorp Vault Transit, AWS KMS and an embedded sealed key store.
 .
 This package ships a hardened systemd unit (kmsgate.service), drop-ins
 for HSM families under /usr/share/doc/kmsgate/examples/dropins, and
 generates a master key in /etc/kmsgate/master-key on installation.
CONTROL
chmod 0644 "$ROOT/DEBIAN/control"

mkdir -p "$DIST_DIR"
OUT=$DIST_DIR/kmsgate_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Z"${DEB_COMPRESS:-xz}" --build "$ROOT" "$OUT" >/dev/null
echo "$OUT"

#!/usr/bin/env bash
# Fetch the embedded default data set (task rt_polarity): the file
#   usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv
# of Debian's python3-pattern package, unpacked under <repo>/.cache/data/python3-pattern.
# Nothing is installed into the system: the .deb is downloaded with `apt-get download` and unpacked with
# `dpkg -x`. Idempotent: does nothing when the file is already there.
#
# Usage: scripts/fetch_embedded_data.sh [--deb FILE.deb] [--dest DIR]
#   --deb FILE.deb  unpack this already downloaded python3-pattern .deb instead of downloading one
#   --dest DIR      unpack into DIR instead of <repo>/.cache/data/python3-pattern
#                   (ds_kdqat looks in the default place; for another DIR set KDQAT_RT_POLARITY_CSV)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo/.cache/data/python3-pattern"
deb=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --deb) deb="${2:?--deb needs a file}"; shift 2 ;;
        --dest) dest="${2:?--dest needs a folder}"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

csv_rel="usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv"
if [[ -f "$dest/$csv_rel" ]]; then
    echo "already there: $dest/$csv_rel"
    exit 0
fi

command -v dpkg >/dev/null || { echo "dpkg not found: this script needs a Debian/Ubuntu system" >&2; exit 1; }
mkdir -p "$dest"
work="$(mktemp -d "$dest/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

if [[ -z "$deb" ]]; then
    command -v apt-get >/dev/null || { echo "apt-get not found: download python3-pattern_*.deb by hand and pass --deb" >&2; exit 1; }
    # apt drops privileges to _apt for downloads; let it write into the work folder.
    chmod 0777 "$work"
    if ! (cd "$work" && apt-get download python3-pattern); then
        echo "apt-get download failed; refreshing the package lists (apt-get update) and retrying" >&2
        if [[ "$(id -u)" -eq 0 ]]; then
            apt-get update
        elif command -v sudo >/dev/null; then
            sudo apt-get update
        else
            echo "cannot run apt-get update without root; ask an administrator, or pass --deb" >&2
            exit 1
        fi
        (cd "$work" && apt-get download python3-pattern)
    fi
    deb="$(ls "$work"/python3-pattern_*.deb | head -n 1)"
fi

# Unpack into the work folder (inside $dest, same file system), copy the tree over, and move the CSV in
# last with a rename, so an interrupted run never leaves a partial CSV that the next run would take as done.
dpkg -x "$deb" "$work/root"
[[ -f "$work/root/$csv_rel" ]] || { echo "$deb does not hold $csv_rel" >&2; exit 1; }
mv "$work/root/$csv_rel" "$work/csv"
cp -a "$work/root/." "$dest/"
mkdir -p "$(dirname "$dest/$csv_rel")"
mv "$work/csv" "$dest/$csv_rel"
echo "fetched: $dest/$csv_rel"

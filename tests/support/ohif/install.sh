#!/usr/bin/env bash
# Installs OHIF Viewer's prebuilt dist/ for tests/test_ohif.py into node_modules/@ohif/app/ (git-ignored).
#
# Why not `npm install @ohif/app`: the package's ~40 dependencies are only its build-time sources (dist/ is
# a finished webpack bundle), and some of them (e.g. @ohif/i18n@3.13.2) are not served by every registry
# mirror. So `npm pack` fetches the one pinned tarball from the npm registry, its sha512 is checked against
# the pin in package.json (the lock), and only dist/ is unpacked, without its source maps and the
# onnxruntime / microscopy bundles that a plain DICOMweb viewing session never loads.
# Idempotent: does nothing when the pinned version is already there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

pin() { node -p "require('./package.json').ohif.$1"; }
name=$(pin package) version=$(pin version) integrity=$(pin integrity)
target=node_modules/$name
installed=$(node -p "try { require('./$target/package.json').version } catch { '' }")
if [ "$installed" = "$version" ] && [ -f "$target/dist/index.html" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tarball=$(npm pack --silent --pack-destination "$work" "$name@$version")
actual="sha512-$(node -e "
  const h = require('crypto').createHash('sha512');
  h.update(require('fs').readFileSync(process.argv[1]));
  console.log(h.digest('base64'))" "$work/$tarball")"
if [ "$actual" != "$integrity" ]; then
  echo "install.sh: $name@$version integrity $actual does not match the pin $integrity" >&2
  exit 1
fi
mkdir -p "$work/app"
tar -xzf "$work/$tarball" -C "$work/app" --strip-components=1 \
  --exclude='*.map' --exclude='package/dist/ort' --exclude='package/dist/dicom-microscopy-viewer' \
  package/package.json package/dist
rm -rf "$target"
mkdir -p "$(dirname "$target")"
mv "$work/app" "$target"
echo "install.sh: $name@$version dist/ in $PWD/$target ($(du -sh "$target" | cut -f1))" >&2

#!/usr/bin/env bash
# Builds the mobile SDK (hexfleet-mobile) in release and generates its
# Kotlin, Swift and Python sources from the library, into target/bindings/:
#   target/bindings/kotlin/uniffi/hexfleet_mobile/hexfleet_mobile.kt  (+ the .so for JNA)
#   target/bindings/swift/hexfleet_mobile.swift, hexfleet_mobileFFI.h, .modulemap
#   target/bindings/python/hexfleet_mobile.py (+ the library it loads)
# With TARGET=<rust target triple> (e.g. aarch64-linux-android, given its
# linker) it builds the library for that target instead.
set -euo pipefail
cd "$(dirname "$0")/.."

target_args=()
dir=target/release
if [ -n "${TARGET:-}" ]; then
  target_args=(--target "$TARGET")
  dir="target/$TARGET/release"
fi
cargo build --release --locked -p hexfleet-mobile --lib "${target_args[@]}"
cargo build --release --locked -p hexfleet-mobile --bin uniffi-bindgen

case "$(uname -s)" in
  Darwin) lib="$dir/libhexfleet_mobile.dylib" ;;
  *) lib="$dir/libhexfleet_mobile.so" ;;
esac
out=target/bindings
rm -rf "$out"
for language in kotlin swift python; do
  ./target/release/uniffi-bindgen generate --library "$lib" --language "$language" --out-dir "$out/$language"
done
cp "$lib" "$out/python/"
cp "$lib" "$out/kotlin/"
strip -o "$out/libhexfleet_mobile.stripped.so" "$lib" 2>/dev/null || true
echo "== generated in $out"
ls -l "$lib" "$out"/libhexfleet_mobile.stripped.so 2>/dev/null || true

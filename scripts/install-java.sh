#!/usr/bin/env bash
# A Java runtime from Debian's packages, for the Spark (pyspark 4) tests: Spark 4 runs on Java 17
# or 21. Does nothing when a java of version 17 or later is on the PATH.
set -euo pipefail
major() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1; }
if command -v java >/dev/null 2>&1 && [ "$(major)" -ge 17 ] 2>/dev/null; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
$sudo apt-get update -qq
# bookworm ships 17, trixie 21: the first one the archive has
for pkg in openjdk-17-jre-headless openjdk-21-jre-headless; do
  if [ -n "$(apt-cache policy "$pkg" 2>/dev/null | sed -n 's/^ *Candidate: \([^(].*\)/\1/p')" ]; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
    break
  fi
done
java -version

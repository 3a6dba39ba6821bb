#!/usr/bin/env bash
# Template-level checks of the Helm chart, no cluster needed: `helm lint --strict` with the
# default values and with each ci/ values file, then the helm-unittest suites of
# charts/portassign/tests (tests/noschema/ with --skip-schema-validation, see there).
# helm and the helm-unittest plugin are built, or reused, by hack/build-tools.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
chart=charts/portassign

helm="$(hack/build-tools.sh helm)/helm"
HELM_PLUGINS=$(hack/build-tools.sh helm-unittest)
export HELM_PLUGINS

for values in "" "$chart"/ci/*.yaml; do
  echo "== helm lint --strict ${values:-(default values)}"
  "$helm" lint --strict "$chart" ${values:+--values "$values"}
done
echo "== helm unittest $chart"
"$helm" unittest --strict "$chart"
echo "== helm unittest --skip-schema-validation $chart/tests/noschema"
"$helm" unittest --strict --skip-schema-validation -f 'tests/noschema/*_test.yaml' "$chart"

{{/*
Chart name, overridable with nameOverride; cut to 63 characters (the label value limit).
*/}}
{{- define "portassign.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's resources: fullnameOverride, else the release name, suffixed
with the chart name unless it already contains it.
*/}}
{{- define "portassign.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "portassign.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "portassign.labels" -}}
helm.sh/chart: {{ include "portassign.chart" . }}
{{ include "portassign.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: portassign
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Name and instance: on the agent's and the janitor's pods alike, so never a selector on
their own (a selector of just these picks janitor pods for the DaemonSet).
*/}}
{{- define "portassign.instanceLabels" -}}
app.kubernetes.io/name: {{ include "portassign.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels that select the agent pods, and only them (the janitor's pods carry component
janitor); they must never change within a release (a DaemonSet's selector is immutable).
*/}}
{{- define "portassign.selectorLabels" -}}
{{ include "portassign.instanceLabels" . }}
app.kubernetes.io/component: agent
{{- end }}

{{/*
Name of the ServiceAccount the agent runs as.
*/}}
{{- define "portassign.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "portassign.fullname" .) .Values.serviceAccount.name }}
{{- else if .Values.serviceAccount.name }}
{{- .Values.serviceAccount.name }}
{{- else }}
{{- fail "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" }}
{{- end }}
{{- end }}

{{/*
The agent image: repository@digest when a digest is set, else repository:tag (the tag
defaulting to the chart's appVersion).
*/}}
{{- define "portassign.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The port ranges (portRange, then extraPortRanges) as the agent's --port-range value,
after checking what values.schema.json cannot express (it cannot compare two fields):
first <= last, privileged ports only when allowed, and the HTTP port outside every range.
*/}}
{{- define "portassign.portRange" -}}
{{- $first := int .Values.portRange.first }}
{{- $last := int .Values.portRange.last }}
{{- $metrics := int .Values.metricsPort }}
{{- if gt $first $last }}
{{- fail (printf "portRange.first (%d) is above portRange.last (%d): the range would be empty; set first <= last" $first $last) }}
{{- end }}
{{- if and (lt $first 1024) (not .Values.allowPrivilegedPorts) }}
{{- fail (printf "portRange.first (%d) is a privileged port (below 1024): set allowPrivilegedPorts: true to allow it, or start the range at 1024 or above" $first) }}
{{- end }}
{{- if and (lt $metrics 1024) (not .Values.allowPrivilegedPorts) }}
{{- fail (printf "metricsPort (%d) is a privileged port (below 1024): set allowPrivilegedPorts: true to allow it, or use a port of 1024 or above" $metrics) }}
{{- end }}
{{- if and (ge $metrics $first) (le $metrics $last) }}
{{- fail (printf "metricsPort (%d) lies inside portRange %d-%d: the agent's own HTTP port would be handed out as well; move one of them" $metrics $first $last) }}
{{- end }}
{{- $ranges := list (printf "%d-%d" $first $last) }}
{{- range $i, $extra := .Values.extraPortRanges }}
{{- $f := int $extra.first }}
{{- $l := int $extra.last }}
{{- if gt $f $l }}
{{- fail (printf "extraPortRanges[%d].first (%d) is above its last (%d): the range would be empty; set first <= last" $i $f $l) }}
{{- end }}
{{- if and (lt $f 1024) (not $.Values.allowPrivilegedPorts) }}
{{- fail (printf "extraPortRanges[%d].first (%d) is a privileged port (below 1024): set allowPrivilegedPorts: true to allow it, or start the range at 1024 or above" $i $f) }}
{{- end }}
{{- if and (ge $metrics $f) (le $metrics $l) }}
{{- fail (printf "metricsPort (%d) lies inside extraPortRanges[%d] %d-%d: the agent's own HTTP port would be handed out as well; move one of them" $metrics $i $f $l) }}
{{- end }}
{{- $ranges = append $ranges (printf "%d-%d" $f $l) }}
{{- end }}
{{- join "," $ranges }}
{{- end }}

{{/*
Whether the agent needs to bind ports below 1024.
*/}}
{{- define "portassign.bindsPrivilegedPorts" -}}
{{- $low := or (lt (int .Values.portRange.first) 1024) (lt (int .Values.metricsPort) 1024) }}
{{- range .Values.extraPortRanges }}{{- if lt (int .first) 1024 }}{{- $low = true }}{{- end }}{{- end }}
{{- if $low }}true{{- end }}
{{- end }}

{{/*
Name of the janitor's resources (Deployment, ServiceAccount, RBAC).
*/}}
{{- define "portassign.janitorName" -}}
{{- printf "%s-janitor" (include "portassign.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the janitor pods (immutable within a release, like the agent's).
*/}}
{{- define "portassign.janitorSelectorLabels" -}}
{{ include "portassign.instanceLabels" . }}
app.kubernetes.io/component: janitor
{{- end }}

{{/*
Labels on every janitor resource.
*/}}
{{- define "portassign.janitorLabels" -}}
helm.sh/chart: {{ include "portassign.chart" . }}
{{ include "portassign.janitorSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: portassign
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The excluded ports as the agent's --exclude-ports value (empty when none), each checked
to be a port or a range of ports 1-65535, first <= last (the schema checks the shape).
*/}}
{{- define "portassign.excludePorts" -}}
{{- range .Values.excludePorts }}
{{- $bounds := splitList "-" . }}
{{- $first := int (first $bounds) }}
{{- $last := int (last $bounds) }}
{{- if or (gt $first 65535) (gt $last 65535) }}
{{- fail (printf "excludePorts item %q is not a port 1-65535 or a range of them" .) }}
{{- end }}
{{- if gt $first $last }}
{{- fail (printf "excludePorts item %q is empty: the first port must not be above the last" .) }}
{{- end }}
{{- end }}
{{- join "," .Values.excludePorts }}
{{- end }}

{{/*
The ports the agent never assigns although in its ranges, as one --exclude-ports style
list: the items of excludePorts, then the NodePort range unless nodePortRange is "none",
each kept only if it overlaps one of the ranges.
*/}}
{{- define "portassign.neverAssigned" -}}
{{- $candidates := list }}
{{- with include "portassign.excludePorts" . }}{{- $candidates = splitList "," . }}{{- end }}
{{- if ne .Values.nodePortRange "none" }}{{- $candidates = append $candidates .Values.nodePortRange }}{{- end }}
{{- $ranges := splitList "," (include "portassign.portRange" .) }}
{{- $excluded := list }}
{{- range $candidates }}
{{- $e := splitList "-" . }}
{{- $overlaps := false }}
{{- range $ranges }}
{{- $r := splitList "-" . }}
{{- if and (le (int (first $e)) (int (last $r))) (ge (int (last $e)) (int (first $r))) }}{{- $overlaps = true }}{{- end }}
{{- end }}
{{- if $overlaps }}{{- $excluded = append $excluded . }}{{- end }}
{{- end }}
{{- join "," $excluded }}
{{- end }}

{{/*
A list of ports and ranges ("22,20000-29999") as a CEL list of [first, last] pairs.
*/}}
{{- define "portassign.celPairs" -}}
{{- $pairs := list }}
{{- range (. | splitList ",") }}
{{- if . }}
{{- $bounds := splitList "-" . }}
{{- $pairs = append $pairs (printf "[%d, %d]" (int (first $bounds)) (int (last $bounds))) }}
{{- end }}
{{- end }}
{{- printf "[%s]" (join ", " $pairs) }}
{{- end }}

{{/*
Name of the admission policy and its binding.
*/}}
{{- define "portassign.admissionPolicyName" -}}
{{- printf "%s-host-ports" (include "portassign.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Whether the chart installs the admission policy: asked for, and served by the API server.
Against a cluster helm lists every served kind ("v1/Pod" among them); `helm template`
without one lists group versions only, and then the policy is rendered (every Kubernetes
the chart supports, 1.32 and later, serves it unless its API server turned it off).
*/}}
{{- define "portassign.admissionPolicy" -}}
{{- $apis := .Capabilities.APIVersions }}
{{- $served := or ($apis.Has "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy") (not ($apis.Has "v1/Pod")) }}
{{- if and .Values.admissionPolicy.enabled $served }}true{{- end }}
{{- end }}

{{- /*
Whether the DRA driver is installed: dra.enabled and the API server serves
resource.k8s.io/v1. "true" or "".
*/}}
{{- define "portassign.dra" -}}
{{- if and .Values.dra.enabled (.Capabilities.APIVersions.Has "resource.k8s.io/v1") }}true{{- end }}
{{- end }}

{{- /*
The claims' range as the agent's --dra-port-range value, checked: not empty, not
privileged, and disjoint from the keys' ranges.
*/}}
{{- define "portassign.draPortRange" -}}
{{- $first := int .Values.dra.portRange.first }}
{{- $last := int .Values.dra.portRange.last }}
{{- if gt $first $last }}
{{- fail (printf "dra.portRange.first (%d) is above dra.portRange.last (%d): the range would be empty; set first <= last" $first $last) }}
{{- end }}
{{- if lt $first 1024 }}
{{- fail (printf "dra.portRange.first (%d) is a privileged port (below 1024): start it at 1024 or above" $first) }}
{{- end }}
{{- $metrics := int .Values.metricsPort }}
{{- if and (le $first $metrics) (le $metrics $last) }}
{{- fail (printf "metricsPort (%d) lies inside dra.portRange %d-%d: the agent's own HTTP port would be handed to a pod as well; move one of them" $metrics $first $last) }}
{{- end }}
{{- range splitList "," (include "portassign.portRange" .) }}
{{- $r := splitList "-" . }}
{{- if and (le $first (int (last $r))) (ge $last (int (first $r))) }}
{{- fail (printf "dra.portRange %d-%d overlaps the keys' range %s: the scheduler counts the DRA range's ports, so keys must never get them; make them disjoint" $first $last .) }}
{{- end }}
{{- end }}
{{- printf "%d-%d" $first $last }}
{{- end }}

{{- /*
Every range the agent assigns from: the keys' ranges, then the claims' range when the
DRA driver is installed.
*/}}
{{- define "portassign.assignedRanges" -}}
{{- include "portassign.portRange" . }}
{{- if include "portassign.dra" . }},{{ include "portassign.draPortRange" . }}{{- end }}
{{- end }}

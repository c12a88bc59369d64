{{/* Names ---------------------------------------------------------------------- */}}

{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The StatefulSet name and the prefix of every object. Pods are <fullname>-K and their
host names end in the ordinal K (node id K+1), so it must not be longer than leaves
room for "-NNN" and the headless Service name within DNS label limits.
*/}}
{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "herald.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "herald.headlessName" -}}
{{- printf "%s-headless" (include "herald.fullname" .) }}
{{- end }}

{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "herald.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels --------------------------------------------------------------------- */}}

{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "herald.labels" -}}
helm.sh/chart: {{ include "herald.chart" . }}
{{ include "herald.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herald
{{- end }}

{{/* Image ---------------------------------------------------------------------- */}}

{{- define "herald.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Secrets -------------------------------------------------------------------- */}}

{{- define "herald.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "herald.fullname" .)) .Values.tls.secretName }}
{{- end }}

{{- define "herald.caSecretName" -}}
{{- default (include "herald.tlsSecretName" .) .Values.tls.caSecretName }}
{{- end }}

{{- define "herald.tokenSecretName" -}}
{{- default (printf "%s-token" (include "herald.fullname" .)) .Values.auth.tokenSecret.name }}
{{- end }}

{{- define "herald.clusterSecretName" -}}
{{- default (printf "%s-cluster" (include "herald.fullname" .)) .Values.cluster.secret.name }}
{{- end }}

{{- define "herald.hs256" -}}
{{- if eq .Values.auth.tokenAlgorithm "HS256" }}true{{ end }}
{{- end }}

{{/* Cluster -------------------------------------------------------------------- */}}

{{/* How many nodes form the cluster (cluster.members). */}}
{{- define "herald.initialReplicas" -}}
{{- $n := int .Values.replicas }}
{{- if not (kindIs "invalid" .Values.cluster.initialReplicas) }}
{{- $n = int .Values.cluster.initialReplicas }}
{{- end }}
{{- if lt $n 1 }}
{{- fail "cluster.initialReplicas must be at least 1" }}
{{- end }}
{{- if gt $n (int .Values.replicas) }}
{{- fail (printf "cluster.initialReplicas (%d) cannot exceed replicas (%d): the initial members must all run" $n (int .Values.replicas)) }}
{{- end }}
{{- $n }}
{{- end }}

{{/* DNS name of pod K: <fullname>-K.<headless>.<namespace>.svc.<clusterDomain> */}}
{{- define "herald.podDomain" -}}
{{- printf "%s.%s.svc.%s" (include "herald.headlessName" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* The client Service's full DNS name. */}}
{{- define "herald.serviceHost" -}}
{{- printf "%s.%s.svc.%s" (include "herald.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* cluster.members: "ID=HOST:PORT" for nodes 1..initialReplicas, as a list. */}}
{{- define "herald.members" -}}
{{- $members := list }}
{{- $full := include "herald.fullname" . }}
{{- $domain := include "herald.podDomain" . }}
{{- range $i := until (int (include "herald.initialReplicas" .)) }}
{{- $members = append $members (printf "%d=%s-%d.%s:%d" (add1 $i) $full $i $domain (int $.Values.ports.quic)) }}
{{- end }}
{{- toJson $members }}
{{- end }}

{{/* The DNS names the node certificate must carry. */}}
{{- define "herald.dnsNames" -}}
{{- $full := include "herald.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $names := list (printf "*.%s" (include "herald.podDomain" .)) (printf "*.%s.%s.svc" (include "herald.headlessName" .) $ns) (include "herald.serviceHost" .) (printf "%s.%s.svc" $full $ns) (printf "%s.%s" $full $ns) $full }}
{{- toJson (concat $names .Values.tls.certManager.extraDnsNames) }}
{{- end }}

{{/* Durations ------------------------------------------------------------------ */}}

{{/* Seconds in a duration like 30s, 2m, 1min, 1h, 1m30s (whole seconds). */}}
{{- define "herald.seconds" -}}
{{- $d := toString . }}
{{- if not (regexMatch "^([0-9]+(h|min|m|s))+$" $d) }}
{{- fail (printf "duration %q: use whole units like 30s, 2m, 1h or 1m30s" $d) }}
{{- end }}
{{- $total := 0 }}
{{- range $part := regexFindAll "[0-9]+[a-z]+" $d -1 }}
{{- $n := int (regexFind "^[0-9]+" $part) }}
{{- $unit := regexFind "[a-z]+$" $part }}
{{- if eq $unit "h" }}{{ $total = add $total (mul $n 3600) }}
{{- else if or (eq $unit "m") (eq $unit "min") }}{{ $total = add $total (mul $n 60) }}
{{- else }}{{ $total = add $total $n }}
{{- end }}
{{- end }}
{{- $total }}
{{- end }}

{{- define "herald.drainSeconds" -}}
{{- $timeout := int (include "herald.seconds" .Values.drain.timeout) }}
{{- if lt $timeout 1 }}
{{- fail "drain.timeout must be above zero" }}
{{- end }}
{{- if ge (int (include "herald.seconds" .Values.drain.sessionsSpread)) $timeout }}
{{- fail (printf "drain.sessionsSpread (%s) must be shorter than drain.timeout (%s)" (toString .Values.drain.sessionsSpread) (toString .Values.drain.timeout)) }}
{{- end }}
{{- $timeout }}
{{- end }}

{{- define "herald.terminationGracePeriodSeconds" -}}
{{- $drain := int (include "herald.drainSeconds" .) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain 30 }}
{{- else }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- if lt $grace (add $drain 20) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least drain.timeout + 20 s (%d): the preStop drain and the shutdown after SIGTERM share it" $grace (add $drain 20)) }}
{{- end }}
{{- $grace }}
{{- end }}
{{- end }}

{{/* TOML ----------------------------------------------------------------------- */}}

{{/* One TOML value: strings as JSON strings (valid TOML basic strings), numbers as
integers when whole (values files give floats), booleans, arrays of those. */}}
{{- define "herald.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ ternary "true" "false" . }}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) }}
{{- if eq (float64 (int64 .)) (float64 .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) (kindIs "int32" .) (kindIs "uint64" .) }}{{ . }}
{{- else if kindIs "slice" . }}
{{- $items := list }}
{{- range $v := . }}{{ $items = append $items (include "herald.tomlValue" $v) }}{{ end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else if kindIs "invalid" . }}
{{- fail "the Herald config has an empty value (null); remove the key or give it a value" }}
{{- else }}
{{- fail (printf "the Herald config has a value TOML cannot take here: %v" .) }}
{{- end }}
{{- end }}

{{- define "herald.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* A whole TOML document from a dict: top-level scalars first, then one table per
dict-valued key (Herald's config is two levels deep). */}}
{{- define "herald.toml" -}}
{{- $doc := . }}
{{- range $k := keys $doc | sortAlpha }}
{{- $v := get $doc $k }}
{{- if not (kindIs "map" $v) }}
{{ include "herald.tomlKey" $k }} = {{ include "herald.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range $k := keys $doc | sortAlpha }}
{{- $v := get $doc $k }}
{{- if kindIs "map" $v }}

[{{ include "herald.tomlKey" $k }}]
{{- range $k2 := keys $v | sortAlpha }}
{{- $v2 := get $v $k2 }}
{{- if kindIs "map" $v2 }}
{{- fail (printf "config.%s.%s: Herald's config has no nested tables" $k $k2) }}
{{- end }}
{{ include "herald.tomlKey" $k2 }} = {{ include "herald.tomlValue" $v2 }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Paths inside the node container. */}}
{{- define "herald.paths" -}}
config: /etc/herald/config/herald.toml
tlsDir: /etc/herald/tls
caDir: /etc/herald/ca
tokenDir: /etc/herald/token
clusterDir: /etc/herald/cluster
dataDir: /var/lib/herald
{{- end }}

{{/* The node config as a dict (user config, then the chart's keys on top). */}}
{{- define "herald.configDict" -}}
{{- $p := include "herald.paths" . | fromYaml }}
{{- $auth := dict "token_algorithm" .Values.auth.tokenAlgorithm }}
{{- if include "herald.hs256" . }}
{{- $_ := set $auth "token_secret_file" (printf "%s/%s" $p.tokenDir .Values.auth.tokenSecret.key) }}
{{- $_ := set $auth "token_public_key_file" "" }}
{{- else }}
{{- $_ := set $auth "token_secret_file" "" }}
{{- $_ := set $auth "token_public_key_file" (printf "%s/%s" $p.tokenDir .Values.auth.publicKey.key) }}
{{- end }}
{{- $listenHost := .Values.listenHost }}
{{- if contains ":" $listenHost }}{{ $listenHost = printf "[%s]" $listenHost }}{{ end }}
{{- $chart := dict
  "listen" (printf "%s:%d" $listenHost (int .Values.ports.quic))
  "admin_listen" (printf "%s:%d" $listenHost (int .Values.ports.admin))
  "data_dir" $p.dataDir
  "tls" (dict
    "cert_file" (printf "%s/%s" $p.tlsDir .Values.tls.certKey)
    "key_file" (printf "%s/%s" $p.tlsDir .Values.tls.keyKey))
  "auth" $auth
  "cluster" (dict
    "node_id_from_ordinal" true
    "members" (include "herald.members" . | fromJsonArray)
    "secret_file" (printf "%s/%s" $p.clusterDir .Values.cluster.secret.key)
    "ca_file" (printf "%s/%s" $p.caDir .Values.tls.caKey)
    "groups" (int .Values.cluster.groups)
    "replication_factor" (int .Values.cluster.replicationFactor))
  "drain" (dict
    "timeout" (toString .Values.drain.timeout)
    "sessions_spread" (toString .Values.drain.sessionsSpread))
}}
{{- $user := deepCopy (default dict .Values.config) }}
{{- $userCluster := get $user "cluster" }}
{{- if kindIs "map" $userCluster }}
{{- range $drop := list "node_id" "join" }}
{{- if hasKey $userCluster $drop }}
{{- fail (printf "config.cluster.%s cannot be set: node ids come from the pod ordinals, and nodes beyond cluster.initialReplicas join (UPGRADING.md)" $drop) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson (mergeOverwrite $user $chart) }}
{{- end }}

{{- define "herald.configToml" -}}
# Herald node configuration, rendered by the Helm chart {{ include "herald.chart" . }}
# for release {{ .Release.Name }}. Every node reads this same file: its node id is 1 +
# the ordinal of its pod name (cluster.node_id_from_ordinal). Edit values.yaml, not this.
{{- include "herald.toml" (include "herald.configDict" . | fromJson) }}
{{- end }}

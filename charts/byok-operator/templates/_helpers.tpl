{{/* The chart name, cut to 63 characters (a label value). */}}
{{- define "byok.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The base of every object name: at most 52 characters, so that suffixed names
     (-selfsigned, -metrics, -keyring) stay within 63. */}}
{{- define "byok.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the operator's pods: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "byok.selectorLabels" -}}
app.kubernetes.io/name: {{ include "byok.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "byok.labels" -}}
{{ include "byok.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: byok-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "byok.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "byok.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator's image (and the sidecar of pods injected before byok-proxy): digest over tag. */}}
{{- define "byok.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "byok.sidecarImage" -}}
{{- $image := required "sidecar.image is required (helm upgrade --reuse-values from a release before it: add --set sidecar.image.repository=ghcr.io/byok-dev/byok-proxy)" .Values.sidecar.image -}}
{{- $repository := required "sidecar.image.repository is required" $image.repository -}}
{{- if eq $repository .Values.image.repository -}}
{{- fail "sidecar.image.repository must differ from image.repository: the broker tells the sidecar's image from the operator's by repository" -}}
{{- end -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "byok.keyringSecret" -}}
{{- default (printf "%s-keyring" (include "byok.fullname" .)) .Values.keyring.existingSecret -}}
{{- end -}}

{{- define "byok.servingSecret" -}}
{{- printf "%s-tls" (include "byok.fullname" .) -}}
{{- end -}}

{{- define "byok.leaseName" -}}
{{- default (include "byok.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{/* The name of the ProviderKey CRD, for the start-up schema check's RBAC rule. */}}
{{- define "byok.crdName" -}}
providerkeys.byok.dev
{{- end -}}

{{/* Rules for ProviderKeys, their Secrets and opted-in pods: cluster-wide, or in each watched namespace. */}}
{{- define "byok.tenantRules" -}}
# Watch ProviderKeys; patch adds and removes the finalizer.
- apiGroups: [byok.dev]
  resources: [providerkeys]
  verbs: [get, list, watch, patch]
# Status is written by server-side apply (a merge patch for an object that does not parse).
- apiGroups: [byok.dev]
  resources: [providerkeys/status]
  verbs: [patch]
# The managed Secret's ownerReference sets blockOwnerDeletion, which needs this.
- apiGroups: [byok.dev]
  resources: [providerkeys/finalizers]
  verbs: [update]
# Kubernetes RBAC cannot select by label, so this covers every Secret here. The operator
# itself reads only Secrets labelled byok.dev/key-source=true and its own managed Secrets
# (label-selected watches); for any other Secret a ProviderKey names it fetches metadata
# only. get: a source or managed Secret; list/watch: the label-selected caches and the
# first-install check; create: a new managed Secret; update: replace it at the
# resourceVersion judged ours; patch: adopt one restored from backup; delete: with its
# ProviderKey, under a UID precondition.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, update, patch, delete]
# The key broker's cache of opted-in pods (label byok.dev/inject=true; kept: metadata and who
# in the pod can read a byok.dev token): a sidecar's token names its pod, which must still
# exist, ask for the key and hold the token in the injected sidecar only.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# The trust bundle sidecars verify the broker with: ConfigMap byok-broker-ca, created where
# a pod is injected, kept at the broker's current CA, deleted and created again when it cannot
# be rewritten (immutable). Only that name; RBAC cannot name an object before it exists, so
# create covers every ConfigMap here (the operator creates only that one). The
# ValidatingAdmissionPolicy <release>-trust keeps everyone else from writing it.
- apiGroups: [""]
  resources: [configmaps]
  resourceNames: [byok-broker-ca]
  verbs: [get, patch, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create]
{{- end }}

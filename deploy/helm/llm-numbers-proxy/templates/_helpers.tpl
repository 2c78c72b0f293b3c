{{/* The chart's name, shortened to Kubernetes' 63 characters. */}}
{{- define "llm-numbers-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: <release>-<chart> unless the release name already contains the chart's. */}}
{{- define "llm-numbers-proxy.fullname" -}}
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

{{- define "llm-numbers-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "llm-numbers-proxy.labels" -}}
helm.sh/chart: {{ include "llm-numbers-proxy.chart" . }}
app.kubernetes.io/name: {{ include "llm-numbers-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llm-numbers-proxy
{{- end }}

{{/* Selector labels of the proxy's pods. */}}
{{- define "llm-numbers-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-numbers-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* Selector labels of the bundled Redis. */}}
{{- define "llm-numbers-proxy.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-numbers-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "llm-numbers-proxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "llm-numbers-proxy.policyConfigMap" -}}
{{- printf "%s-policy" (include "llm-numbers-proxy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-numbers-proxy.redisName" -}}
{{- printf "%s-redis" (include "llm-numbers-proxy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Checks the Redis settings: at most one source of the URL, and a shared Redis whenever more than
one replica may run (each process would otherwise keep its own budgets and limits).
*/}}
{{- define "llm-numbers-proxy.validateRedis" -}}
{{- $sources := 0 }}
{{- if .Values.redis.enabled }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.redis.externalUrl }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.redis.urlFromSecret }}{{ $sources = add1 $sources }}{{ end }}
{{- if gt $sources 1 }}
{{- fail "set only one of redis.enabled, redis.externalUrl and redis.urlFromSecret" }}
{{- end }}
{{- if and .Values.redis.urlFromSecret (not .Values.existingSecret) }}
{{- fail "redis.urlFromSecret needs existingSecret (the Secret holding LLM_PROXY_REDIS_URL)" }}
{{- end }}
{{- if and (eq $sources 0) (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "more than one replica needs a shared Redis: set redis.enabled, redis.externalUrl or redis.urlFromSecret (or replicaCount: 1 with autoscaling.enabled: false)" }}
{{- end }}
{{- end }}

{{/* The LLM_PROXY_REDIS_URL env entry, or nothing (embedded in-process store). */}}
{{- define "llm-numbers-proxy.redisEnv" -}}
{{- if .Values.redis.enabled }}
- name: LLM_PROXY_REDIS_URL
  value: {{ printf "redis://%s:6379/0" (include "llm-numbers-proxy.redisName" .) | quote }}
{{- else if .Values.redis.externalUrl }}
- name: LLM_PROXY_REDIS_URL
  value: {{ .Values.redis.externalUrl | quote }}
{{- else if .Values.redis.urlFromSecret }}
- name: LLM_PROXY_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret }}
      key: LLM_PROXY_REDIS_URL
{{- end }}
{{- end }}

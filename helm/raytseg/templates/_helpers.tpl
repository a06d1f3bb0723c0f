{{/*
Names. KubeRay limits RayService/RayJob names to 47 characters; "-batch" is appended for
the RayJob, so the full name stays within 41.
*/}}
{{- define "raytseg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 41 | trimSuffix "-" }}
{{- end }}

{{- define "raytseg.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 41 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 41 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 41 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "raytseg.batchName" -}}
{{- printf "%s-batch" (include "raytseg.fullname" .) }}
{{- end }}

{{/* The Service KubeRay creates for a RayService's Serve endpoints (port 8000). */}}
{{- define "raytseg.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "raytseg.fullname" .) }}
{{- end }}

{{- define "raytseg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raytseg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "raytseg.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "raytseg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "raytseg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "raytseg.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image: "<repository>:<tag>-<variant>" for a variant (cpu, cuda). */}}
{{- define "raytseg.image" -}}
{{- $root := .root }}
{{- printf "%s:%s-%s" $root.Values.image.repository (default $root.Chart.AppVersion $root.Values.image.tag) .variant }}
{{- end }}

{{/* Where the API token Secret is mounted, and the file serve.auth.token_file names. */}}
{{- define "raytseg.apiTokenDir" -}}/var/run/secrets/raytseg/api{{- end }}
{{- define "raytseg.dicomwebDir" -}}/var/run/secrets/raytseg/dicomweb{{- end }}

{{/*
The app's ServeConfig: the `serve` values plus what the chart owns (where the API tokens are
mounted), as the builder args of raytseg.serve.app:build_app.
*/}}
{{- define "raytseg.serveArgs" -}}
{{- $serve := deepCopy .Values.serve }}
{{- if .Values.apiAuth.existingSecret }}
{{- $auth := deepCopy (default (dict) $serve.auth) }}
{{- $_ := set $auth "token_file" (printf "%s/%s" (include "raytseg.apiTokenDir" .) .Values.apiAuth.secretKey) }}
{{- $_ := set $serve "auth" $auth }}
{{- end }}
{{- toYaml $serve }}
{{- end }}

{{/*
serveConfigV2: Serve's multi-application config, built as data and rendered with toYaml.
The proxy's timeout sits 60 s above the app's own (request_timeout_s), so the app answers
504 first, as `raytseg serve` does locally.
*/}}
{{- define "raytseg.serveConfig" -}}
{{- $timeout := int (default 1800 .Values.serve.request_timeout_s) }}
{{- $app := dict "name" (default "raytseg" .Values.serve.app_name) "import_path" "raytseg.serve.app:build_app" "route_prefix" "/" "args" (include "raytseg.serveArgs" . | fromYaml) }}
{{- with .Values.rayService.deployments }}
{{- $_ := set $app "deployments" . }}
{{- end }}
{{- $http := dict "host" "0.0.0.0" "port" 8000 "request_timeout_s" (add $timeout 60) }}
{{- $config := dict "proxy_location" .Values.rayService.proxyLocation "http_options" $http "logging_config" .Values.rayService.loggingConfig "applications" (list $app) }}
{{- toYaml $config }}
{{- end }}

{{/* Pod-level settings shared by every Ray pod. Args: root, node (head|worker), group values. */}}
{{- define "raytseg.podSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values -}}
serviceAccountName: {{ include "raytseg.serviceAccountName" $root }}
{{- /* Only the head's autoscaler sidecar talks to the Kubernetes API. */}}
automountServiceAccountToken: {{ and (eq .node "head") $v.autoscaling.enabled }}
{{- /* KubeRay requires it with autoscaler v2 and SidecarMode: a failed Ray node is replaced, not restarted. */}}
restartPolicy: Never
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Environment of every Ray container: where weights and caches are, storage settings. */}}
{{- define "raytseg.env" -}}
{{- $v := .Values -}}
- name: RAYTSEG_CACHE_DIR
  value: /var/cache/raytseg
- name: TOTALSEG_HOME_DIR
  value: /var/cache/raytseg/totalsegmentator
{{- if $v.weights.uri }}
- name: RAYTSEG_WEIGHTS
  value: {{ $v.weights.uri | quote }}
{{- else if $v.weights.existingClaim }}
- name: RAYTSEG_WEIGHTS
  value: /weights
{{- end }}
{{- with $v.storage.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $v.storage.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- if $v.dicomweb.existingSecret }}
{{- $dir := include "raytseg.dicomwebDir" . }}
{{- range $name, $key := dict "TOKEN" $v.dicomweb.tokenKey "USER" $v.dicomweb.userKey "PASSWORD" $v.dicomweb.passwordKey }}
{{- if $key }}
- name: RAYTSEG_DICOMWEB_{{ $name }}_FILE
  value: {{ printf "%s/%s" $dir $key | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- with $v.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "raytseg.volumeMounts" -}}
- name: raytseg-cache
  mountPath: /var/cache/raytseg
{{- if .root.Values.apiAuth.existingSecret }}
- name: api-tokens
  mountPath: {{ include "raytseg.apiTokenDir" .root }}
  readOnly: true
{{- end }}
{{- if .root.Values.dicomweb.existingSecret }}
- name: dicomweb-credentials
  mountPath: {{ include "raytseg.dicomwebDir" .root }}
  readOnly: true
{{- end }}
{{- if .root.Values.weights.existingClaim }}
- name: weights
  mountPath: /weights
  readOnly: true
{{- end }}
{{- if .batchConfig }}
- name: batch-job
  mountPath: /etc/raytseg/batch
  readOnly: true
{{- end }}
{{- with .root.Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "raytseg.volumes" -}}
- name: raytseg-cache
  emptyDir:
    sizeLimit: {{ .root.Values.weights.cacheSizeLimit }}
{{- if .root.Values.apiAuth.existingSecret }}
- name: api-tokens
  secret:
    secretName: {{ .root.Values.apiAuth.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if .root.Values.dicomweb.existingSecret }}
- name: dicomweb-credentials
  secret:
    secretName: {{ .root.Values.dicomweb.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if .root.Values.weights.existingClaim }}
- name: weights
  persistentVolumeClaim:
    claimName: {{ .root.Values.weights.existingClaim }}
    readOnly: true
{{- end }}
{{- if .batchConfig }}
- name: batch-job
  configMap:
    name: {{ include "raytseg.batchName" .root }}
{{- end }}
{{- with .root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
A Ray pod template. Args: root, node (head|worker), group (values of the group), component
(serve|batch), batchConfig (mount the batch job's config), gpu (add GPUs).
*/}}
{{- define "raytseg.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values -}}
metadata:
  labels:
    {{- include "raytseg.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- include "raytseg.podSpec" . | nindent 2 }}
  containers:
    - name: {{ printf "ray-%s" .node }}
      image: {{ include "raytseg.image" (dict "root" $root "variant" .group.imageVariant) }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      ports:
        {{- if eq .node "head" }}
        - {name: gcs, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        - {name: as-metrics, containerPort: 44217}
        - {name: dash-metrics, containerPort: 44227}
        {{- end }}
        - {name: serve, containerPort: 8000}
        - {name: metrics, containerPort: 8080}
      {{- $resources := deepCopy (default (dict) .group.resources) }}
      {{- if .gpu }}
      {{- $limits := default (dict) $resources.limits }}
      {{- $_ := set $limits .group.gpuResourceName (int .group.gpusPerPod) }}
      {{- $_ := set $resources "limits" $limits }}
      {{- $requests := default (dict) $resources.requests }}
      {{- $_ := set $requests .group.gpuResourceName (int .group.gpusPerPod) }}
      {{- $_ := set $resources "requests" $requests }}
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      env:
        {{- include "raytseg.env" $root | nindent 8 }}
      {{- if $v.storage.existingSecret }}
      envFrom:
        - secretRef:
            name: {{ $v.storage.existingSecret }}
      {{- end }}
      securityContext:
        {{- toYaml $v.containerSecurityContext | nindent 8 }}
      volumeMounts:
        {{- include "raytseg.volumeMounts" . | nindent 8 }}
      {{- if eq .node "worker" }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      {{- end }}
  volumes:
    {{- include "raytseg.volumes" . | nindent 4 }}
{{- end }}

{{/* A worker group. Args: root, group (values), component, gpu. */}}
{{- define "raytseg.workerGroup" -}}
- groupName: {{ .group.groupName }}
  replicas: {{ .group.replicas }}
  minReplicas: {{ .group.minReplicas }}
  maxReplicas: {{ .group.maxReplicas }}
  rayStartParams:
    {{- toYaml (mergeOverwrite (dict "metrics-export-port" "8080") (deepCopy (default (dict) .group.rayStartParams))) | nindent 4 }}
  template:
    {{- include "raytseg.podTemplate" (dict "root" .root "node" "worker" "group" .group "component" .component "gpu" .gpu) | nindent 4 }}
{{- end }}

{{/*
The RayCluster spec of the service (RayService.rayClusterConfig) and of a batch job
(RayJob.rayClusterSpec). Args: root, component (serve|batch).
*/}}
{{- define "raytseg.clusterSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $batch := eq .component "batch" -}}
rayVersion: {{ $v.rayVersion | quote }}
enableInTreeAutoscaling: {{ $v.autoscaling.enabled }}
{{- if $v.autoscaling.enabled }}
autoscalerOptions:
  version: {{ $v.autoscaling.version }}
  upscalingMode: {{ $v.autoscaling.upscalingMode }}
  idleTimeoutSeconds: {{ $v.autoscaling.idleTimeoutSeconds }}
  image: {{ include "raytseg.image" (dict "root" $root "variant" $v.head.imageVariant) }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  resources:
    {{- toYaml $v.autoscaling.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.containerSecurityContext | nindent 4 }}
{{- end }}
authOptions:
  mode: {{ $v.rayAuth.mode }}
  {{- with $v.rayAuth.secretName }}
  secretName: {{ . }}
  {{- end }}
{{- if $v.head.gcsFaultTolerance.enabled }}
gcsFaultToleranceOptions:
  redisAddress: {{ required "head.gcsFaultTolerance.redisAddress is required when GCS fault tolerance is enabled" $v.head.gcsFaultTolerance.redisAddress | quote }}
  {{- with $v.head.gcsFaultTolerance.passwordSecret.name }}
  redisPassword:
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $v.head.gcsFaultTolerance.passwordSecret.key }}
  {{- end }}
{{- end }}
headGroupSpec:
  {{- /* The head runs no replicas (num-cpus "0"), whatever head.rayStartParams says. */}}
  {{- $params := mergeOverwrite (dict "dashboard-host" "0.0.0.0" "metrics-export-port" "8080") (deepCopy (default (dict) $v.head.rayStartParams)) (dict "num-cpus" "0") }}
  rayStartParams:
    {{- toYaml $params | nindent 4 }}
  template:
    {{- include "raytseg.podTemplate" (dict "root" $root "node" "head" "group" $v.head "component" .component "batchConfig" $batch) | nindent 4 }}
workerGroupSpecs:
  {{- if $v.cpuWorkers.enabled }}
  {{- $cpu := $v.cpuWorkers }}
  {{- if $batch }}{{ $cpu = mergeOverwrite (deepCopy $v.cpuWorkers) $v.batch.cpuWorkers }}{{ end }}
  {{- include "raytseg.workerGroup" (dict "root" $root "group" $cpu "component" .component "gpu" false) | nindent 2 }}
  {{- end }}
  {{- if $v.gpuWorkers.enabled }}
  {{- $gpu := $v.gpuWorkers }}
  {{- if $batch }}{{ $gpu = mergeOverwrite (deepCopy $v.gpuWorkers) $v.batch.gpuWorkers }}{{ end }}
  {{- include "raytseg.workerGroup" (dict "root" $root "group" $gpu "component" .component "gpu" true) | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Checks across values that the schema cannot express; fail with what to change. */}}
{{- define "raytseg.validate" -}}
{{- $v := .Values }}
{{- if and (not $v.cpuWorkers.enabled) (not $v.gpuWorkers.enabled) }}
{{- fail "cpuWorkers and gpuWorkers are both disabled: the head runs no model or CPU-stage replicas (num-cpus 0), so nothing could run" }}
{{- end }}
{{- /* Model deployment specs: models, pool (if enabled) and per-task overrides; ServeConfig's num_gpus default is 0.25. */}}
{{- $specs := list ($v.serve.models | default dict) }}
{{- $pool := $v.serve.pool | default dict }}
{{- if or (not (hasKey $pool "enabled")) $pool.enabled }}{{ $specs = append $specs $pool }}{{ end }}
{{- range $name, $task := ($v.serve.tasks | default dict) }}
{{- with ($task | default dict).model }}{{ $specs = append $specs . }}{{ end }}
{{- end }}
{{- $wantsGpu := false }}
{{- range $specs }}
{{- if or (not (hasKey . "num_gpus")) (gt (float64 .num_gpus) 0.0) }}{{ $wantsGpu = true }}{{ end }}
{{- end }}
{{- if and $wantsGpu (not $v.gpuWorkers.enabled) }}
{{- fail "serve asks for GPU shares (serve.models/pool num_gpus > 0) but gpuWorkers.enabled is false: set num_gpus: 0 and device: cpu, or enable GPU workers" }}
{{- end }}
{{- with ($v.serve.ingress | default dict) }}
{{- if and .on_head (gt (float64 (ternary .num_cpus 0.5 (hasKey . "num_cpus"))) 0.0) }}
{{- fail "serve.ingress.on_head is true but serve.ingress.num_cpus > 0: the head starts with num-cpus 0, so the ingress could never be placed; set num_cpus: 0" }}
{{- end }}
{{- end }}
{{- if and (eq $v.rayService.upgradeStrategy.type "NewClusterWithIncrementalUpgrade") (not $v.autoscaling.enabled) }}
{{- fail "rayService.upgradeStrategy NewClusterWithIncrementalUpgrade needs autoscaling.enabled (KubeRay requires the autoscaler for it)" }}
{{- end }}
{{- if and (not (kindIs "invalid" $v.serve.auth)) $v.serve.auth.required (not $v.apiAuth.existingSecret) (not $v.serve.auth.token_file) }}
{{- fail "serve.auth.required is true but no tokens are configured: set apiAuth.existingSecret (a Secret with the tokens)" }}
{{- end }}
{{- with $v.dicomweb }}
{{- if and .existingSecret (not .tokenKey) (not (and .userKey .passwordKey)) }}
{{- fail "dicomweb.existingSecret is set but names no credentials: set dicomweb.tokenKey, or dicomweb.userKey and dicomweb.passwordKey (keys of that Secret)" }}
{{- end }}
{{- if and (not .existingSecret) (or .tokenKey .userKey .passwordKey) }}
{{- fail "dicomweb keys are set but dicomweb.existingSecret is empty: name the Secret that holds them" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Names ------------------------------------------------------------------------------------- */}}

{{- define "mixserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Leaves room for the longest suffix ("-worker-" + group name) within 63 characters. */}}
{{- define "mixserve.fullname" -}}
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

{{- define "mixserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mixserve.headServiceName" -}}
{{- printf "%s-head" (include "mixserve.fullname" .) }}
{{- end }}

{{- define "mixserve.workersServiceName" -}}
{{- printf "%s-workers" (include "mixserve.fullname" .) }}
{{- end }}

{{- define "mixserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mixserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mixserve.rayAuthSecretName" -}}
{{- default (printf "%s-ray-auth" (include "mixserve.fullname" .)) .Values.rayAuth.existingSecret }}
{{- end }}

{{- define "mixserve.modelClaimName" -}}
{{- default (printf "%s-model" (include "mixserve.fullname" .)) .Values.model.pvc.existingClaim }}
{{- end }}

{{/* Labels ------------------------------------------------------------------------------------ */}}

{{- define "mixserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mixserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mixserve.labels" -}}
helm.sh/chart: {{ include "mixserve.chart" . }}
{{ include "mixserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mixserve
{{- end }}

{{/* Pod selector of the head pod (gateway + coordinators). */}}
{{- define "mixserve.headSelectorLabels" -}}
{{ include "mixserve.selectorLabels" . }}
app.kubernetes.io/component: head
{{- end }}

{{/* Pod selector of one worker group; call with (dict "root" $ "group" $group). */}}
{{- define "mixserve.workerSelectorLabels" -}}
{{ include "mixserve.selectorLabels" .root }}
app.kubernetes.io/component: worker
mixserve/worker-group: {{ .group.name }}
{{- end }}

{{/* Serving settings ---------------------------------------------------------------------------- */}}

{{- define "mixserve.cuda" -}}
{{- if eq .Values.serve.device "cuda" }}true{{ end }}
{{- end }}

{{- define "mixserve.image" -}}
{{- $variant := ternary "cuda" "cpu" (eq .Values.serve.device "cuda") }}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $variant) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "mixserve.modelDir" -}}
{{- if eq .Values.model.source "image" }}
{{- .Values.model.imagePath }}
{{- else }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) .Values.model.dir }}
{{- end }}
{{- end }}

{{/* Checks that the head and worker groups can hold the expert-parallel group (serve.expertWorkers +
     serve.coordinators ranks, one Ray bundle each); fails the render otherwise. */}}
{{- define "mixserve.validate" -}}
{{- $cuda := eq .Values.serve.device "cuda" }}
{{- /* every rank is a Ray bundle {CPU: 1} (+ {GPU: 1} on CUDA) */}}
{{- $slots := ternary (min (int .Values.head.raySlots) (int .Values.head.gpus)) (int .Values.head.raySlots) $cuda }}
{{- range .Values.workerGroups }}
{{- $slots = add $slots (mul (int .replicas) (int .expertWorkersPerPod)) }}
{{- if and $cuda (lt (int .gpusPerPod) (int .expertWorkersPerPod)) }}
{{- fail (printf "workerGroups[%s]: gpusPerPod (%d) must be >= expertWorkersPerPod (%d) on CUDA: each expert worker takes one GPU" .name (int .gpusPerPod) (int .expertWorkersPerPod)) }}
{{- end }}
{{- end }}
{{- $coordinators := int .Values.serve.coordinators }}
{{- if and (gt $coordinators 1) (lt (int .Values.serve.expertWorkers) 1) }}
{{- fail (printf "serve.coordinators (%d) > 1 needs serve.expertWorkers >= 1, got %d: the coordinators share the experts of the expert workers" $coordinators (int .Values.serve.expertWorkers)) }}
{{- end }}
{{- include "mixserve.validateExperts" . }}
{{- $ranks := add (int .Values.serve.expertWorkers) $coordinators }}
{{- if lt (int $slots) (int $ranks) }}
{{- fail (printf "serve.expertWorkers (%d) + serve.coordinators (%d) need %d Ray bundles%s, but the head and worker groups offer only %d (head: min(raySlots, gpus) on CUDA; workers: replicas * expertWorkersPerPod)" (int .Values.serve.expertWorkers) $coordinators (int $ranks) (ternary " with one GPU each" "" $cuda) (int $slots)) }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "enable metrics.serviceMonitor or metrics.podMonitor, not both: each would scrape the gateway once more" }}
{{- end }}
{{- if and .Values.model.download.enabled (eq .Values.model.source "image") }}
{{- fail "model.download needs a volume: set model.source to pvc or hostPath" }}
{{- end }}
{{- if and .Values.model.download.enabled (not .Values.model.download.repoId) }}
{{- fail "model.download.enabled needs model.download.repoId (e.g. mistralai/Mixtral-8x7B-Instruct-v0.1)" }}
{{- end }}
{{- include "mixserve.validateGateway" . }}
{{- include "mixserve.validateNetwork" . }}
{{- end }}

{{/* Checks of serve.redundantExperts and serve.balancer: expert copies live on the expert workers. */}}
{{- define "mixserve.validateExperts" -}}
{{- $workers := int .Values.serve.expertWorkers }}
{{- if and (gt (int .Values.serve.redundantExperts) 0) (lt $workers 1) }}
{{- fail (printf "serve.redundantExperts (%d) > 0 needs serve.expertWorkers >= 1, got %d: the extra expert copies live on the expert workers" (int .Values.serve.redundantExperts) $workers) }}
{{- end }}
{{- with .Values.serve.balancer }}
{{- if and (gt (float64 .interval) 0.0) (lt $workers 1) }}
{{- fail (printf "serve.balancer.interval (%v) > 0 needs serve.expertWorkers >= 1, got %d: the balancer moves expert copies between the expert workers" .interval $workers) }}
{{- end }}
{{- /* the schema bounds numbers; these catch decimal strings (helm --set passes fractions as strings) */}}
{{- if le (float64 .window) 0.0 }}
{{- fail (printf "serve.balancer.window (%v) must be > 0 seconds" .window) }}
{{- end }}
{{- if gt (float64 .threshold) 1.0 }}
{{- fail (printf "serve.balancer.threshold (%v) must be within 0 and 1: a relative drop of the predicted imbalance" .threshold) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Checks of rdma.* and nccl.env. */}}
{{- define "mixserve.validateNetwork" -}}
{{- if and .Values.rdma.enabled (ne .Values.serve.device "cuda") }}
{{- fail (printf "rdma.enabled needs serve.device=cuda: on %s the ranks talk over gloo (TCP), which uses no RDMA device" .Values.serve.device) }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if hasKey ($.Values.nccl.env | default dict) .name }}
{{- fail (printf "%s is set in both nccl.env and extraEnv: set it in one of them" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Checks of gateway.tls and gateway.apiKeys: every enabled part names its Secret. */}}
{{- define "mixserve.validateGateway" -}}
{{- $tls := .Values.gateway.tls }}
{{- if $tls.enabled }}
{{- $_ := required "gateway.tls.enabled needs gateway.tls.existingSecret: the name of a kubernetes.io/tls Secret with tls.crt and tls.key" $tls.existingSecret }}
{{- $taken := dict "serve.grpcPort" .Values.serve.grpcPort "serve.metricsPort" .Values.serve.metricsPort "serve.httpPort" (ternary .Values.serve.httpPort 0 .Values.serve.httpEnabled) "ray.gcsPort" .Values.ray.gcsPort "ray.dashboardPort" .Values.ray.dashboardPort "ray.clientPort" .Values.ray.clientPort "ray.dashboardAgentPort" .Values.ray.dashboardAgentPort }}
{{- range $name, $port := $taken }}
{{- if eq (int $port) (int $tls.healthPort) }}
{{- fail (printf "gateway.tls.healthPort (%d) must differ from %s: the probes' plaintext health port needs a port of its own" (int $tls.healthPort) $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- if $tls.clientCA.enabled }}
{{- if not $tls.enabled }}
{{- fail "gateway.tls.clientCA.enabled needs gateway.tls.enabled: client certificates (mTLS) need TLS" }}
{{- end }}
{{- $_ := required "gateway.tls.clientCA.enabled needs gateway.tls.clientCA.existingSecret: the name of a Secret holding the PEM CA bundle that signs client certificates" $tls.clientCA.existingSecret }}
{{- end }}
{{- if .Values.serve.httpEnabled }}
{{- range $name := list "grpcPort" "metricsPort" }}
{{- if eq (int (get $.Values.serve $name)) (int $.Values.serve.httpPort) }}
{{- fail (printf "serve.httpPort (%d) must differ from serve.%s" (int $.Values.serve.httpPort) $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.gateway.apiKeys.enabled }}
{{- $_ := required "gateway.apiKeys.enabled needs gateway.apiKeys.existingSecret: the name of a Secret holding the API keys file (one key per line)" .Values.gateway.apiKeys.existingSecret }}
{{- end }}
{{- end }}

{{/* `mixserve serve` command line, one argument per line (YAML list items). */}}
{{- define "mixserve.serveArgs" -}}
- serve
- {{ printf "--model=%s" (include "mixserve.modelDir" .) | quote }}
- --workers={{ int .Values.serve.expertWorkers }}
- --coordinators={{ int .Values.serve.coordinators }}
- --host=0.0.0.0
- --port={{ int .Values.serve.grpcPort }}
- --metrics-host=0.0.0.0
- --metrics-port={{ int .Values.serve.metricsPort }}
{{- if .Values.serve.httpEnabled }}
- --http-port={{ int .Values.serve.httpPort }}
{{- else }}
- --no-http
{{- end }}
- --device={{ .Values.serve.device }}
{{- with .Values.serve.dtype }}
- --dtype={{ . }}
{{- end }}
- --ray-address=auto
- --placement={{ .Values.serve.placement }}
- --kv-cache-mib={{ int .Values.serve.kvCacheMiB }}
{{- if gt (int .Values.serve.redundantExperts) 0 }}
- --redundant-experts={{ int .Values.serve.redundantExperts }}
{{- end }}
{{- with .Values.serve.routingProfile }}
- {{ printf "--routing-profile=%s" . | quote }}
{{- end }}
{{- with .Values.serve.balancer }}
{{- if gt (float64 .interval) 0.0 }}
- --balance-interval={{ include "mixserve.number" .interval }}
- --balance-window={{ include "mixserve.number" .window }}
- --balance-threshold={{ include "mixserve.number" .threshold }}
{{- end }}
{{- end }}
{{- if gt (float64 .Values.serve.rejoinDelay) 0.0 }}
- --rejoin-delay={{ include "mixserve.number" .Values.serve.rejoinDelay }}
{{- end }}
{{- $dir := include "mixserve.gatewaySecretsDir" . }}
{{- if .Values.gateway.tls.enabled }}
- --tls-cert={{ $dir }}/tls/tls.crt
- --tls-key={{ $dir }}/tls/tls.key
{{- if .Values.gateway.tls.clientCA.enabled }}
- --tls-client-ca={{ $dir }}/client-ca/ca.crt
{{- end }}
- --health-port={{ int .Values.gateway.tls.healthPort }}
{{- end }}
{{- if .Values.gateway.apiKeys.enabled }}
- --api-keys-file={{ $dir }}/api-keys/keys
{{- end }}
{{- range .Values.serve.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* A number as a flag value: whole numbers without Go's exponent form (1000000, not 1e+06). */}}
{{- define "mixserve.number" -}}
{{- if eq (float64 .) (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* The serve command as one shell-quoted string (for `exec` at the end of a startup script). */}}
{{- define "mixserve.serveCommand" -}}
{{- $args := fromYamlArray (include "mixserve.serveArgs" .) }}
{{- $quoted := list }}
{{- range $args }}{{ $quoted = append $quoted (squote .) }}{{ end }}
{{- printf "mixserve %s" (join " " $quoted) }}
{{- end }}

{{/* Shared pod pieces ----------------------------------------------------------------------------- */}}

{{/* Environment of every Ray container (head, workers, KubeRay or not). */}}
{{- define "mixserve.rayEnv" -}}
- name: HOME
  value: /tmp
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: PYTHONUNBUFFERED
  value: "1"
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "mixserve.rayAuthSecretName" . }}
      key: {{ .Values.rayAuth.secretKey }}
{{- end }}
{{- range $name, $value := .Values.nccl.env }}
- name: {{ $name }}
  value: {{ toString $value | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "mixserve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- if ne .Values.model.source "image" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "mixserve.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.ray.shmSize }}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ include "mixserve.modelClaimName" . }}
{{- else if eq .Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: {{ .Values.model.hostPath.type }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Gateway TLS material and API keys: Secrets mounted read-only into the head pod only. ----------- */}}

{{- define "mixserve.gatewaySecretsDir" -}}
/etc/mixserve
{{- end }}

{{/* Mode 0440: the key files are readable by their group, podSecurityContext.fsGroup, and no one else. */}}
{{- define "mixserve.gatewayVolumes" -}}
{{- $tls := .Values.gateway.tls }}
{{- if $tls.enabled }}
- name: gateway-tls
  secret:
    secretName: {{ $tls.existingSecret }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- if $tls.clientCA.enabled }}
- name: gateway-client-ca
  secret:
    secretName: {{ $tls.clientCA.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $tls.clientCA.key }}
        path: ca.crt
{{- end }}
{{- end }}
{{- if .Values.gateway.apiKeys.enabled }}
- name: gateway-api-keys
  secret:
    secretName: {{ .Values.gateway.apiKeys.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.gateway.apiKeys.key }}
        path: keys
{{- end }}
{{- end }}

{{- define "mixserve.gatewayVolumeMounts" -}}
{{- $dir := include "mixserve.gatewaySecretsDir" . }}
{{- if .Values.gateway.tls.enabled }}
- name: gateway-tls
  mountPath: {{ $dir }}/tls
  readOnly: true
{{- if .Values.gateway.tls.clientCA.enabled }}
- name: gateway-client-ca
  mountPath: {{ $dir }}/client-ca
  readOnly: true
{{- end }}
{{- end }}
{{- if .Values.gateway.apiKeys.enabled }}
- name: gateway-api-keys
  mountPath: {{ $dir }}/api-keys
  readOnly: true
{{- end }}
{{- end }}

{{/* Init container that fetches the checkpoint from the Hugging Face Hub (model.download). */}}
{{- define "mixserve.initContainers" -}}
{{- if .Values.model.download.enabled }}
{{- $d := .Values.model.download }}
- name: download-model
  image: {{ default (include "mixserve.image" .) $d.image }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import json, os
      from huggingface_hub import snapshot_download
      path = snapshot_download(
          repo_id=os.environ["MODEL_REPO_ID"],
          revision=os.environ["MODEL_REVISION"],
          local_dir=os.environ["MODEL_DIR"],
          allow_patterns=json.loads(os.environ["MODEL_ALLOW_PATTERNS"]) or None,
      )
      print(f"checkpoint ready in {path}", flush=True)
  env:
    - name: HOME
      value: /tmp
    - name: HF_HOME
      value: /tmp/huggingface
    - name: HF_HUB_DISABLE_TELEMETRY
      value: "1"
    - name: MODEL_REPO_ID
      value: {{ $d.repoId | quote }}
    - name: MODEL_REVISION
      value: {{ $d.revision | quote }}
    - name: MODEL_DIR
      value: {{ include "mixserve.modelDir" . | quote }}
    - name: MODEL_ALLOW_PATTERNS
      value: {{ toJson $d.allowPatterns | quote }}
    {{- if $d.hfTokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $d.hfTokenSecret.name }}
          key: {{ $d.hfTokenSecret.key }}
    {{- end }}
  resources:
    {{- toYaml $d.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: model
      mountPath: {{ .Values.model.mountPath }}
{{- end }}
{{- end }}

{{/* Does a Ray pod with this many GPUs run ranks that get rdma.* (rdma.enabled, on CUDA, gpus > 0)?
     Call with (dict "root" $ "gpus" N); "true" or "". */}}
{{- define "mixserve.rdmaRanks" -}}
{{- if and .root.Values.rdma.enabled (eq .root.Values.serve.device "cuda") (gt (int .gpus) 0) }}true{{ end }}
{{- end }}

{{/* Resources of a Ray container with the GPUs (and the RDMA devices of rdma.*) added on CUDA, as requests
     and limits; call with (dict "root" $ "resources" R "gpus" N). An RDMA resource the pod's own resources
     already name keeps its count (limits first). */}}
{{- define "mixserve.gpuResources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- $limits := default dict (get $res "limits") }}
{{- $requests := default dict (get $res "requests") }}
{{- if and (eq .root.Values.serve.device "cuda") (gt (int .gpus) 0) }}
{{- $_ := set $limits .root.Values.gpuResourceName (int .gpus) }}
{{- $_ := set $requests .root.Values.gpuResourceName (int .gpus) }}
{{- end }}
{{- $rdma := .root.Values.rdma }}
{{- if and (include "mixserve.rdmaRanks" .) (gt (int $rdma.count) 0) }}
{{- $count := get $limits $rdma.resourceName | default (get $requests $rdma.resourceName) | default (int $rdma.count) }}
{{- $_ := set $limits $rdma.resourceName $count }}
{{- $_ := set $requests $rdma.resourceName $count }}
{{- end }}
{{- if $limits }}{{ $_ := set $res "limits" $limits }}{{ end }}
{{- if $requests }}{{ $_ := set $res "requests" $requests }}{{ end }}
{{- toYaml $res }}
{{- end }}

{{/* securityContext of a Ray container: .Values.securityContext, plus IPC_LOCK for rank pods when
     rdma.enabled and rdma.ipcLock; call with (dict "root" $ "gpus" N). */}}
{{- define "mixserve.raySecurityContext" -}}
{{- $sc := deepCopy (default dict .root.Values.securityContext) }}
{{- if and (include "mixserve.rdmaRanks" .) .root.Values.rdma.ipcLock }}
{{- $caps := default dict (get $sc "capabilities") }}
{{- $_ := set $caps "add" (get $caps "add" | default list | concat (list "IPC_LOCK") | uniq) }}
{{- $_ := set $sc "capabilities" $caps }}
{{- end }}
{{- toYaml $sc }}
{{- end }}

{{/* Port of the head's gRPC probes: serve.grpcPort, or with TLS on the gateway's plaintext health-only port
     (--health-port), since Kubernetes' gRPC probes cannot speak TLS. */}}
{{- define "mixserve.probePort" -}}
{{- ternary (int .Values.gateway.tls.healthPort) (int .Values.serve.grpcPort) .Values.gateway.tls.enabled }}
{{- end }}

{{/* A probe with its gRPC port set to mixserve.probePort. */}}
{{- define "mixserve.grpcProbe" -}}
{{- $probe := deepCopy .probe }}
{{- if hasKey $probe "grpc" }}
{{- $_ := set $probe.grpc "port" (int (include "mixserve.probePort" .root)) }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/* A probe with its httpGet port set to ray.dashboardAgentPort. */}}
{{- define "mixserve.agentProbe" -}}
{{- $probe := deepCopy .probe }}
{{- if hasKey $probe "httpGet" }}
{{- $_ := set $probe.httpGet "port" (int .root.Values.ray.dashboardAgentPort) }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{- define "mixserve.headPorts" -}}
- name: grpc
  containerPort: {{ .Values.serve.grpcPort }}
  protocol: TCP
{{- if .Values.gateway.tls.enabled }}
- name: grpc-health
  containerPort: {{ .Values.gateway.tls.healthPort }}
  protocol: TCP
{{- end }}
- name: http-metrics
  containerPort: {{ .Values.serve.metricsPort }}
  protocol: TCP
{{- if .Values.serve.httpEnabled }}
- name: http
  containerPort: {{ .Values.serve.httpPort }}
  protocol: TCP
{{- end }}
- name: gcs-server
  containerPort: {{ .Values.ray.gcsPort }}
  protocol: TCP
- name: dashboard
  containerPort: {{ .Values.ray.dashboardPort }}
  protocol: TCP
- name: client
  containerPort: {{ .Values.ray.clientPort }}
  protocol: TCP
{{- if .Values.hostNetwork }}
{{- /* the head's dashboard agent listens there too: declared, it keeps a worker pod off the head's node */}}
- name: dashboard-agt
  containerPort: {{ .Values.ray.dashboardAgentPort }}
  protocol: TCP
{{- end }}
{{- end }}

{{/* Container ports with hostNetwork on: each also a hostPort (Kubernetes requires hostPort == containerPort
     there), so the scheduler never puts two pods that listen on one port on the same node. */}}
{{- define "mixserve.withHostPorts" -}}
{{- if .root.Values.hostNetwork }}
{{- $ports := fromYamlArray .ports }}
{{- range $ports }}{{ $_ := set . "hostPort" (int .containerPort) }}{{ end }}
{{- toYaml $ports }}
{{- else }}
{{- .ports | trim }}
{{- end }}
{{- end }}

{{- define "mixserve.workerPorts" -}}
- name: dashboard-agt
  containerPort: {{ .Values.ray.dashboardAgentPort }}
  protocol: TCP
{{- end }}

{{/* Head startup script: ray start (non-blocking), then the gateway in the foreground. */}}
{{- define "mixserve.headScript" -}}
set -eu
ulimit -n 65536 || true
{{- if .Values.kuberay.enabled }}
# KubeRay's generated `ray start --head ...` without --block, so the gateway can run after it.
${KUBERAY_GEN_RAY_START_CMD//--block/}
{{- else }}
ray start --head --port={{ .Values.ray.gcsPort }} --dashboard-host=0.0.0.0 --dashboard-port={{ .Values.ray.dashboardPort }} --ray-client-server-port={{ .Values.ray.clientPort }} --dashboard-agent-listen-port={{ .Values.ray.dashboardAgentPort }} --num-cpus={{ int .Values.head.raySlots }} --num-gpus={{ ternary (int .Values.head.gpus) 0 (eq .Values.serve.device "cuda") }}
{{- end }}
exec {{ include "mixserve.serveCommand" . }}
{{- end }}

{{/* Worker startup script (plain workloads): wait for the head's GCS, then ray start --block. */}}
{{- define "mixserve.workerScript" -}}
{{- $root := .root }}
{{- $head := printf "%s.%s.svc" (include "mixserve.headServiceName" $root) $root.Release.Namespace -}}
set -eu
ulimit -n 65536 || true
for _ in $(seq 1 150); do
  (exec 3<>/dev/tcp/{{ $head }}/{{ $root.Values.ray.gcsPort }}) 2>/dev/null && break
  echo "waiting for the Ray head at {{ $head }}:{{ $root.Values.ray.gcsPort }}"; sleep 2
done
exec ray start --address={{ $head }}:{{ $root.Values.ray.gcsPort }} --block --dashboard-agent-listen-port={{ $root.Values.ray.dashboardAgentPort }} --num-cpus={{ int .group.expertWorkersPerPod }} --num-gpus={{ ternary (int .group.gpusPerPod) 0 (eq $root.Values.serve.device "cuda") }}
{{- end }}

{{/* Pod specs shared by the plain workloads (Deployment, StatefulSets) and the KubeRay RayCluster. */}}

{{- define "mixserve.commonPodSpec" -}}
serviceAccountName: {{ include "mixserve.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- if .Values.hostNetwork }}
hostNetwork: true
# a host-network pod resolves cluster names (the head's Service) only with this policy
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- end }}

{{/* The head pod: ray start --head, then `mixserve serve` (gateway + coordinators) in the foreground. */}}
{{- define "mixserve.headPodSpec" -}}
{{- $h := .Values.head }}
{{- include "mixserve.commonPodSpec" . }}
terminationGracePeriodSeconds: {{ $h.terminationGracePeriodSeconds }}
{{- with $h.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with (include "mixserve.initContainers" .) }}
initContainers:
  {{- . | nindent 2 }}
{{- end }}
containers:
  - name: ray-head
    image: {{ include "mixserve.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command:
      - /bin/bash
      - -c
      - --
    args:
      - |
        {{- include "mixserve.headScript" . | nindent 8 }}
    env:
      {{- include "mixserve.rayEnv" . | nindent 6 }}
    ports:
      {{- include "mixserve.withHostPorts" (dict "root" . "ports" (include "mixserve.headPorts" .)) | nindent 6 }}
    {{- with $h.startupProbe }}
    startupProbe:
      {{- include "mixserve.grpcProbe" (dict "root" $ "probe" .) | nindent 6 }}
    {{- end }}
    {{- with $h.readinessProbe }}
    readinessProbe:
      {{- include "mixserve.grpcProbe" (dict "root" $ "probe" .) | nindent 6 }}
    {{- end }}
    {{- with $h.livenessProbe }}
    livenessProbe:
      {{- include "mixserve.grpcProbe" (dict "root" $ "probe" .) | nindent 6 }}
    {{- end }}
    resources:
      {{- include "mixserve.gpuResources" (dict "root" . "resources" $h.resources "gpus" $h.gpus) | nindent 6 }}
    securityContext:
      {{- include "mixserve.raySecurityContext" (dict "root" . "gpus" $h.gpus) | nindent 6 }}
    volumeMounts:
      {{- include "mixserve.volumeMounts" . | nindent 6 }}
      {{- with (include "mixserve.gatewayVolumeMounts" . | trim) }}
      {{- . | nindent 6 }}
      {{- end }}
volumes:
  {{- include "mixserve.volumes" . | nindent 2 }}
  {{- with (include "mixserve.gatewayVolumes" . | trim) }}
  {{- . | nindent 2 }}
  {{- end }}
{{- with $h.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $h.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $h.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A worker pod: ray start --address=<head> --block; call with (dict "root" $ "group" $group). */}}
{{- define "mixserve.workerPodSpec" -}}
{{- $root := .root }}
{{- $g := .group }}
{{- include "mixserve.commonPodSpec" $root }}
terminationGracePeriodSeconds: 30
{{- with $g.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with (include "mixserve.initContainers" $root) }}
initContainers:
  {{- . | nindent 2 }}
{{- end }}
containers:
  - name: ray-worker
    image: {{ include "mixserve.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command:
      - /bin/bash
      - -c
      - --
    args:
      - |
        {{- if $root.Values.kuberay.enabled }}
        set -eu
        ulimit -n 65536 || true
        exec $KUBERAY_GEN_RAY_START_CMD
        {{- else }}
        {{- include "mixserve.workerScript" . | nindent 8 }}
        {{- end }}
    env:
      {{- include "mixserve.rayEnv" $root | nindent 6 }}
    ports:
      {{- include "mixserve.withHostPorts" (dict "root" $root "ports" (include "mixserve.workerPorts" $root)) | nindent 6 }}
    {{- with $root.Values.workerProbes.readinessProbe }}
    readinessProbe:
      {{- include "mixserve.agentProbe" (dict "root" $root "probe" .) | nindent 6 }}
    {{- end }}
    {{- with $root.Values.workerProbes.livenessProbe }}
    livenessProbe:
      {{- include "mixserve.agentProbe" (dict "root" $root "probe" .) | nindent 6 }}
    {{- end }}
    resources:
      {{- include "mixserve.gpuResources" (dict "root" $root "resources" $g.resources "gpus" $g.gpusPerPod) | nindent 6 }}
    securityContext:
      {{- include "mixserve.raySecurityContext" (dict "root" $root "gpus" $g.gpusPerPod) | nindent 6 }}
    volumeMounts:
      {{- include "mixserve.volumeMounts" $root | nindent 6 }}
volumes:
  {{- include "mixserve.volumes" $root | nindent 2 }}
{{- with $g.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

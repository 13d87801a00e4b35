"""Tests of the deployment artefacts: Dockerfile, Kubernetes manifests, compose file."""

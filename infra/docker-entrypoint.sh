#!/bin/sh
# Entrypoint of Dockerfile.gpu: export the model paths baked in at build time
# (/models/models.env, written by infra/fetch_models.py) unless the environment
# already sets them, then run the command (the Celery worker by default).
set -eu

models_env=${MODELS_ENV_FILE:-/models/models.env}
if [ -f "$models_env" ]; then
    while IFS='=' read -r name value; do
        case "$name" in
            ECG_*)
                if [ -z "$(printenv "$name" || true)" ]; then
                    export "$name=$value"
                fi
                ;;
        esac
    done < "$models_env"
fi

exec "$@"

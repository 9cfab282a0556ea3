# The front door of deploy/compose.yaml: Debian's nginx with the configuration the one-machine stacks render
# (deploy/nginx/nginx.conf, from training/deploy/proxy.py), on the same pinned Debian base as the other images.
FROM docker.io/library/python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/nginx && chown -R nobody:nogroup /var/lib/nginx
COPY deploy/nginx/nginx.conf /etc/nginx/cifar10.conf
EXPOSE 3000
CMD ["nginx", "-c", "/etc/nginx/cifar10.conf", "-e", "stderr"]

# One redisq hub (redisq-server). Build from the repository root:
#   docker build -t redisq .
# EXTRAS=lab also installs the lab (pandas, ...) for the `redisq` CLI, which the
# mock workers of docker/compose.test.yml run:
#   docker build --build-arg EXTRAS=lab -t redisq-lab .
FROM python:3.11-slim

ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY redisq_lab ./redisq_lab
RUN pip install ".${EXTRAS:+[$EXTRAS]}" \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin redisq

# Listen on every interface inside the container; Redis comes from REDIS_URL
# (or REDIS_HOST/REDIS_PORT/REDIS_DB/REDIS_PASSWORD). See docs/deploy.md.
ENV HUB_HOST=0.0.0.0 \
    HUB_PORT=8000
EXPOSE 8000
USER redisq
WORKDIR /home/redisq

# /health answers 200 when the hub and its Redis are up, 503 when Redis is not
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HUB_PORT', '8000') + '/health', timeout=2)"]

# SIGTERM (docker stop) closes every socket with 1001 and requeues the jobs of this
# hub's workers at once; give it time with `docker stop -t 30` / stop_grace_period.
ENTRYPOINT ["redisq-server"]

# One image for every Cascade service; compose.yaml picks the subcommand.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch's default Linux wheel on PyPI carries several GB of CUDA libraries; the CPU index serves
# 2.13.0+cpu, which satisfies the constraints' torch==2.13.0 and wins as the higher version.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY cascade ./cascade
COPY services ./services
RUN pip install --extra-index-url "${TORCH_INDEX}" -c constraints.txt . \
    && useradd --create-home --uid 10001 cascade \
    && mkdir -p /models \
    && chown cascade:cascade /models

# A named volume mounted here starts with this ownership, so the non-root user can write models.
ENV CASCADE_HOME=/models
VOLUME ["/models"]
USER cascade
WORKDIR /home/cascade
EXPOSE 8000

CMD ["cascade", "--help"]

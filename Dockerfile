# One image for every tasklease service; compose.yaml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app

COPY pyproject.toml requirements.lock README.md ./
COPY tasklease ./tasklease
COPY engine ./engine
COPY api ./api
COPY handlers ./handlers
COPY schema ./schema
RUN pip install --no-cache-dir --constraint requirements.lock . \
    && useradd --system --no-create-home tasklease

USER tasklease
EXPOSE 8080
ENTRYPOINT ["tasklease"]
CMD ["--help"]

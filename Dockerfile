# Image for k8s/. The service runs against external Redis and Postgres there (URLs from the Secret).
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir . && useradd --system --uid 10001 inventory
USER 10001
EXPOSE 50051 9100
ENTRYPOINT ["inventory-svc"]
CMD ["serve"]

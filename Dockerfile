# Image for k8s/. The service runs against external Redis and Postgres there (URLs from the Secret).
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir . && useradd --system --uid 10001 inventory
# Compile the routing kernels into numba's cache now, so a pod loads them in under a second
# instead of compiling for about a minute; the cache dir stays writable for numba's checks.
RUN python -c "import routing; routing.warm_up()" \
    && chown -R 10001 "$(python -c 'import routing, os; print(os.path.dirname(routing.__file__))')"
USER 10001
EXPOSE 50051 9100
ENTRYPOINT ["inventory-svc"]
CMD ["serve"]

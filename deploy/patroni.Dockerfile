# PostgreSQL 15 run by Patroni (the `ha` extra's pins), for deploy/docker-compose.yml and k8s.
FROM postgres:15
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv \
    && python3 -m venv /opt/patroni \
    && /opt/patroni/bin/pip install --no-cache-dir 'patroni[etcd3]==4.1.5' 'psycopg[binary]==3.3.9' \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/patroni.yml /etc/patroni/patroni.yml
USER postgres
EXPOSE 5432 8008
CMD ["/opt/patroni/bin/patroni", "/etc/patroni/patroni.yml"]

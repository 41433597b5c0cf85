FROM python:3.11-slim

# util-linux's setsid (in the base image) gives every run its own process group.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY twisted ./twisted
RUN pip install --no-cache-dir . && rm -rf /src

# The agent runs commands as this user; give it what your tasks need.
RUN useradd --system --create-home --home-dir /var/lib/taskscheduler taskscheduler
USER taskscheduler
WORKDIR /var/lib/taskscheduler
# Named volumes mounted here start out owned by the daemons' user.
RUN mkdir -p /var/lib/taskscheduler/agent /var/lib/taskscheduler/server \
    && mkdir -m 700 /var/lib/taskscheduler/secrets
EXPOSE 8080 8081
CMD ["twistd", "-n", "--pidfile=", "taskscheduler-server"]

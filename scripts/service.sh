# Sourced by the test services' scripts (s3-server.sh, slurm-cluster.sh, mlflow-server.sh).

# Stops the process whose PID is in the file $1 (with the process group it leads, if it leads
# one: a server's own workers), waiting up to 5 s before SIGKILL, and removes the file.
stop_pid_file() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 -- "-$pid" 2>/dev/null || kill -9 "$pid" 2>/dev/null || true
  rm -f "$file"
}

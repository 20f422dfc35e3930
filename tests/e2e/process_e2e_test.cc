// End-to-end tests of the `simserve` executable as a child process: flags and SIMSERVE_*
// environment precedence, --help, the /metrics endpoint, and SIGTERM during a stream
// (drains, exits 0 within the grace period). Loopback only; the child is always reaped.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/e2e/e2e_util.h"

extern char** environ;

namespace simserve::e2e {
namespace {

using ::testing::HasSubstr;

// A spawned simserve whose stderr (and stdout) is read through a pipe.
class Child {
 public:
  Child(const std::vector<std::string>& args, const std::vector<std::string>& extra_env) {
    int fds[2];
    if (pipe(fds) != 0) return;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDERR_FILENO);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&actions, fds[0]);
    std::vector<std::string> env_strings;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string var(*e);
      // The test decides the server's SIMSERVE_* settings and OpenMP wait policy.
      if (var.rfind("SIMSERVE_", 0) != 0 && var.rfind("GOMP_SPINCOUNT=", 0) != 0 &&
          var.rfind("OMP_WAIT_POLICY=", 0) != 0) {
        env_strings.emplace_back(var);
      }
    }
    env_strings.insert(env_strings.end(), extra_env.begin(), extra_env.end());
    std::vector<char*> argv{const_cast<char*>(SIMSERVE_BINARY)};
    argv.reserve(args.size() + 2);
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    std::vector<char*> envp;
    envp.reserve(env_strings.size() + 1);
    for (auto& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    if (posix_spawn(&pid_, SIMSERVE_BINARY, &actions, nullptr, argv.data(), envp.data()) != 0) {
      pid_ = -1;
    }
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    out_fd_ = fds[0];
  }

  ~Child() {
    if (pid_ > 0 && !exit_code_.has_value()) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_fd_ >= 0) close(out_fd_);
  }

  bool started() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  // Reads output until it contains `text` or `timeout` passes.
  bool WaitFor(const std::string& text, absl::Duration timeout) {
    const absl::Time end = absl::Now() + timeout;
    while (output_.find(text) == std::string::npos) {
      const int64_t left = absl::ToInt64Milliseconds(end - absl::Now());
      if (left <= 0 || !ReadSome(static_cast<int>(left))) return false;
    }
    return true;
  }

  // Waits up to `timeout` for the exit; returns the exit code (-1: signal or timeout).
  int WaitExit(absl::Duration timeout) {
    const absl::Time end = absl::Now() + timeout;
    while (absl::Now() < end) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        while (ReadSome(100)) {
        }
        return *exit_code_;
      }
      ReadSome(20);
    }
    return -1;
  }

  const std::string& output() const { return output_; }

 private:
  bool ReadSome(int timeout_ms) {
    pollfd p{out_fd_, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    char buf[4096];
    const ssize_t n = read(out_fd_, buf, sizeof(buf));
    if (n <= 0) return false;
    output_.append(buf, static_cast<size_t>(n));
    return true;
  }

  pid_t pid_ = -1;
  int out_fd_ = -1;
  std::string output_;
  std::optional<int> exit_code_;
};

// GET /metrics from 127.0.0.1:port with a plain socket.
std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string request =
        "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if (write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
      char buf[8192];
      ssize_t n = 0;
      while ((n = read(fd, buf, sizeof(buf))) > 0) response.append(buf, static_cast<size_t>(n));
    }
  }
  close(fd);
  return response;
}

// The number after "(port " following `after` in the startup line, or -1.
int PortAfter(const std::string& output, const std::string& after) {
  const size_t at = output.find(after);
  if (at == std::string::npos) return -1;
  const size_t port = output.find("(port ", at);
  if (port == std::string::npos) return -1;
  return std::atoi(output.c_str() + port + 6);
}

TEST(Process, HelpDocumentsEveryFlagWithItsDefaultAndVariable) {
  Child child({"--help"}, {});
  ASSERT_TRUE(child.started());
  EXPECT_EQ(child.WaitExit(absl::Seconds(20)), 1);  // absl's --help exits with 1
  for (const char* flag : {"listen",
                           "metrics_listen",
                           "workers",
                           "threads_per_worker",
                           "stream_window",
                           "warmup",
                           "max_input_elements",
                           "max_flops",
                           "max_output_bytes",
                           "max_queued_requests",
                           "max_inflight_bytes",
                           "max_receive_message_bytes",
                           "max_send_message_bytes",
                           "default_chunk_bytes",
                           "max_chunk_bytes",
                           "drain_grace",
                           "max_connection_age",
                           "log_requests",
                           "upload_read_ahead_bytes",
                           "omp_spin_count",
                           "buffer_cache_bytes"}) {
    EXPECT_THAT(child.output(), HasSubstr(std::string("--") + flag + " ")) << flag;
  }
  EXPECT_THAT(child.output(), HasSubstr("SIMSERVE_METRICS_LISTEN"));
  EXPECT_THAT(child.output(), HasSubstr("default: \"0.0.0.0:50051\""));
  EXPECT_THAT(child.output(), HasSubstr("default: \"0.0.0.0:9464\""));
}

TEST(Process, BadEnvironmentValueIsRejectedAtStartup) {
  Child child({}, {"SIMSERVE_MAX_FLOPS=lots"});
  ASSERT_TRUE(child.started());
  EXPECT_EQ(child.WaitExit(absl::Seconds(20)), 2);
  EXPECT_THAT(child.output(), HasSubstr("invalid SIMSERVE_MAX_FLOPS=lots"));
}

TEST(Process, SpinCountBelowAutoIsRejectedAtStartup) {
  Child child({"--listen=127.0.0.1:0", "--metrics_listen=", "--omp_spin_count=-3"}, {});
  ASSERT_TRUE(child.started());
  EXPECT_NE(child.WaitExit(absl::Seconds(20)), 0);
  EXPECT_THAT(child.output(), HasSubstr("--omp_spin_count must be >= 0, -1"));
}

TEST(Process, SigtermDuringAStreamDrainsItAndExitsZero) {
  // The environment sets an unusable listen address and the flag overrides it (flag beats
  // environment); the grace period and warm-up come from the environment only.
  Child child({"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0", "--workers=1",
               "--threads_per_worker=1"},
              {"SIMSERVE_LISTEN=256.1.1.1:1", "SIMSERVE_DRAIN_GRACE=15s", "SIMSERVE_WARMUP=false"});
  ASSERT_TRUE(child.started());
  ASSERT_TRUE(child.WaitFor("warm-up disabled", absl::Seconds(60))) << child.output();
  const int port = PortAfter(child.output(), "serving gRPC on ");
  const int metrics_port = PortAfter(child.output(), "metrics on ");
  ASSERT_GT(port, 0);
  ASSERT_GT(metrics_port, 0);
  EXPECT_THAT(child.output(), HasSubstr("drain_grace=15s"));
  EXPECT_THAT(child.output(), HasSubstr("warm-up disabled"));

  auto stub = v1::Similarity::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  const Problem p = RandomProblem(1, 200, 256, 8, 21);
  v1::ComputeRequest req = MakeRequest(p, v1::COSINE);
  req.set_max_chunk_bytes(4096);  // 4 rows per tile: 50 tiles
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub->ComputeStream(&ctx, req);
  StreamResult r;
  int64_t next_batch = 0, next_row = 0;
  v1::ComputeChunk chunk;
  bool signalled = false;
  while (stream->Read(&chunk)) {
    ASSERT_EQ(AddChunk(&r, chunk, &next_batch, &next_row, p.n), "");
    if (!signalled && r.chunks.size() == 2) {
      // Metrics are scraped while the stream runs, then SIGTERM arrives mid-stream.
      const std::string metrics = HttpGet(metrics_port, "/metrics");
      EXPECT_THAT(metrics, HasSubstr("200 OK"));
      EXPECT_THAT(metrics, HasSubstr("grpc_server_started_total"));
      ASSERT_EQ(kill(child.pid(), SIGTERM), 0);
      signalled = true;
    }
    absl::SleepFor(absl::Milliseconds(5));  // a slowish reader: the drain must wait for it
  }
  const grpc::Status status = stream->Finish();
  // The running stream completes during the drain.
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(r.chunks.size(), 50U);
  ExpectMatches(p, req, r.shape, r.values, r.indices, r.dtype);
  EXPECT_EQ(child.WaitExit(absl::Seconds(20)), 0) << child.output();
  EXPECT_THAT(child.output(), HasSubstr("draining"));
  EXPECT_THAT(child.output(), HasSubstr("drained and stopped"));
  // After the exit, new calls fail with UNAVAILABLE.
  grpc::ClientContext after;
  after.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::GetInfoResponse info;
  EXPECT_EQ(stub->GetInfo(&after, v1::GetInfoRequest(), &info).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

TEST(Process, OpenMpThreadsSleepAtOnceUnlessTheOperatorChoseAPolicy) {
  // The default (auto: 0 without shared memory) is applied by one re-exec (libgomp reads it
  // at load time).
  Child passive({"--listen=127.0.0.1:0", "--metrics_listen=", "--warmup=false"}, {});
  ASSERT_TRUE(passive.started());
  ASSERT_TRUE(passive.WaitFor("warm-up disabled", absl::Seconds(60))) << passive.output();
  EXPECT_THAT(passive.output(), HasSubstr("OpenMP wait: GOMP_SPINCOUNT=0 OMP_WAIT_POLICY=passive"));
  // The re-exec keeps the process's name (ps, top, a container's init).
  std::string comm;
  ASSERT_TRUE(absl::StrContains(passive.output(), "OpenMP wait"));
  {
    std::ifstream in("/proc/" + std::to_string(passive.pid()) + "/comm");
    std::getline(in, comm);
  }
  EXPECT_EQ(comm, "simserve");
  // A variable set by the operator wins over the flag and is reported as such.
  Child chosen(
      {"--listen=127.0.0.1:0", "--metrics_listen=", "--warmup=false", "--omp_spin_count=1000"},
      {"GOMP_SPINCOUNT=5000"});
  ASSERT_TRUE(chosen.started());
  ASSERT_TRUE(chosen.WaitFor("warm-up disabled", absl::Seconds(60))) << chosen.output();
  EXPECT_THAT(chosen.output(),
              HasSubstr("OpenMP wait: GOMP_SPINCOUNT=5000 OMP_WAIT_POLICY=(unset)"));
  // The flag sets a bounded spin when nothing is in the environment.
  Child bounded(
      {"--listen=127.0.0.1:0", "--metrics_listen=", "--warmup=false", "--omp_spin_count=1000"}, {});
  ASSERT_TRUE(bounded.started());
  ASSERT_TRUE(bounded.WaitFor("warm-up disabled", absl::Seconds(60))) << bounded.output();
  EXPECT_THAT(bounded.output(),
              HasSubstr("OpenMP wait: GOMP_SPINCOUNT=1000 OMP_WAIT_POLICY=(unset)"));
  // The default with shared memory allowed: a short bounded spin (same-host calls), 2000.
  Child sidecar(
      {"--listen=127.0.0.1:0", "--metrics_listen=", "--warmup=false", "--allow_shared_memory"}, {});
  ASSERT_TRUE(sidecar.started());
  ASSERT_TRUE(sidecar.WaitFor("warm-up disabled", absl::Seconds(60))) << sidecar.output();
  EXPECT_THAT(sidecar.output(),
              HasSubstr("OpenMP wait: GOMP_SPINCOUNT=2000 OMP_WAIT_POLICY=(unset)"));
}

}  // namespace
}  // namespace simserve::e2e

// Closed-loop unary load generator for tests/bench/data_path.py: keeps --concurrency calls of
// one pre-serialized request (a file of protobuf bytes, sent as is through grpc::GenericStub)
// in flight on one channel, for --duration_s seconds or --total calls, from one thread, and
// prints a JSON summary: count, seconds, rps, p50/p99 ms and the status codes (named like ghz).
// It never (re)serializes a message, so its CPU per call stays far below ghz's, which
// re-marshals the 4 MiB medium request on every call and caps the rps it can measure.
//
// Usage: unary_load --target=127.0.0.1:50051 --method=/simserve.v1.Similarity/Compute
//                   --request=FILE [--concurrency=1] [--duration_s=3 | --total=N]
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string target;
  std::string method;
  std::string request;
  int concurrency = 1;
  double duration_s = 3;
  int64_t total = 0;  // > 0: stop after this many calls instead of after duration_s
};

// One call slot: re-armed with a fresh context each time its call completes.
struct Slot {
  std::unique_ptr<grpc::ClientContext> context;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader;
  grpc::ByteBuffer response;
  grpc::Status status;
  Clock::time_point start;
};

// The status code names ghz prints (Go's codes.Code.String()).
const char* CodeName(grpc::StatusCode code) {
  static constexpr std::array<const char*, 17> kNames = {
      "OK",       "Canceled",       "Unknown",          "InvalidArgument",   "DeadlineExceeded",
      "NotFound", "AlreadyExists",  "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
      "Aborted",  "OutOfRange",     "Unimplemented",    "Internal",          "Unavailable",
      "DataLoss", "Unauthenticated"};
  const auto index = static_cast<size_t>(code);
  return index < kNames.size() ? kNames[index] : "Unknown";
}

bool ParseArgs(int argc, char** argv, Options* options) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    if (arg.rfind("--", 0) != 0 || eq == std::string::npos) return false;
    const std::string key = arg.substr(2, eq - 2);
    const std::string value = arg.substr(eq + 1);
    if (key == "target") {
      options->target = value;
    } else if (key == "method") {
      options->method = value;
    } else if (key == "request") {
      options->request = value;
    } else if (key == "concurrency") {
      options->concurrency = std::stoi(value);
    } else if (key == "duration_s") {
      options->duration_s = std::stod(value);
    } else if (key == "total") {
      options->total = std::stoll(value);
    } else {
      return false;
    }
  }
  return !options->target.empty() && !options->method.empty() && !options->request.empty() &&
         options->concurrency > 0;
}

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  const auto rank = static_cast<size_t>(p * static_cast<double>(values.size() - 1));
  std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(rank),
                   values.end());
  return values[rank];
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (!ParseArgs(argc, argv, &options)) {
    std::fprintf(stderr,
                 "usage: unary_load --target=HOST:PORT --method=/pkg.Service/Method "
                 "--request=FILE [--concurrency=N] [--duration_s=S | --total=N]\n");
    return 2;
  }
  std::ifstream file(options.request, std::ios::binary);
  if (!file) {
    std::fprintf(stderr, "unary_load: cannot read %s\n", options.request.c_str());
    return 2;
  }
  const std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  grpc::Slice slice(bytes);
  const grpc::ByteBuffer request(&slice, 1);

  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  grpc::GenericStub stub(
      grpc::CreateCustomChannel(options.target, grpc::InsecureChannelCredentials(), args));
  grpc::CompletionQueue cq;

  std::vector<Slot> slots(static_cast<size_t>(options.concurrency));
  int64_t issued = 0;
  const auto launch = [&](Slot& slot) {
    slot.reader.reset();  // the finished call's reader lives in its context's call arena
    slot.context = std::make_unique<grpc::ClientContext>();
    slot.context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    slot.start = Clock::now();
    slot.reader = stub.PrepareUnaryCall(slot.context.get(), options.method, request, &cq);
    slot.reader->StartCall();
    slot.reader->Finish(&slot.response, &slot.status, &slot);
    ++issued;
  };

  const Clock::time_point begin = Clock::now();
  const Clock::time_point end = begin + std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(options.duration_s));
  const auto more = [&] { return options.total > 0 ? issued < options.total : Clock::now() < end; };
  size_t in_flight = 0;
  for (size_t i = 0; i < slots.size() && more(); ++i, ++in_flight) launch(slots[i]);

  std::map<std::string, int64_t> codes;
  std::string first_error;
  std::vector<double> latencies_ms;
  void* tag = nullptr;
  bool ok = false;
  while (in_flight > 0 && cq.Next(&tag, &ok)) {
    Slot& slot = *static_cast<Slot*>(tag);
    latencies_ms.push_back(
        std::chrono::duration<double, std::milli>(Clock::now() - slot.start).count());
    ++codes[CodeName(slot.status.error_code())];
    if (!slot.status.ok() && first_error.empty()) first_error = slot.status.error_message();
    if (more()) {
      launch(slot);
    } else {
      --in_flight;
    }
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - begin).count();

  std::ostringstream json;
  json << "{\"count\": " << latencies_ms.size() << ", \"seconds\": " << seconds
       << ", \"rps\": " << static_cast<double>(latencies_ms.size()) / seconds
       << ", \"p50_ms\": " << Percentile(latencies_ms, 0.5)
       << ", \"p99_ms\": " << Percentile(latencies_ms, 0.99) << ", \"codes\": {";
  for (auto it = codes.begin(); it != codes.end(); ++it) {
    json << (it == codes.begin() ? "" : ", ") << '"' << it->first << "\": " << it->second;
  }
  std::string error;  // the message as a JSON string: escape quotes, backslashes, controls
  for (const char c : first_error) {
    if (c == '"' || c == '\\') error += '\\';
    error += static_cast<unsigned char>(c) < 0x20 ? ' ' : c;
  }
  json << "}, \"first_error\": \"" << error << "\"}\n";
  std::fputs(json.str().c_str(), stdout);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return 0;
}

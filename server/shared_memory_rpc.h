// The system shared-memory RPCs of both front ends (simserve.v1.Similarity and
// inference.GRPCInferenceService), whose messages have the same fields: one implementation
// over SharedMemoryRegistry for either message family.
#ifndef SIMSERVE_SERVER_SHARED_MEMORY_RPC_H_
#define SIMSERVE_SERVER_SHARED_MEMORY_RPC_H_

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/log.h"
#include "server/shared_memory.h"

namespace simserve {

// SystemSharedMemoryRegister: maps the region (SharedMemoryRegistry::Register's errors).
template <class Request>
absl::Status RegisterSharedMemory(SharedMemoryRegistry& registry, const Request& request,
                                  const std::string& peer) {
  absl::Status status =
      registry.Register(request.name(), request.key(), request.offset(), request.byte_size());
  if (status.ok()) {
    LogInfo(absl::StrCat("shared memory region '", request.name(), "' registered: ", request.key(),
                         " [", request.offset(), ", +", request.byte_size(), ") (peer ", peer,
                         ")"));
  }
  return status;
}

// SystemSharedMemoryStatus: fills response.regions (NOT_FOUND for an unknown name).
template <class Request, class Response>
absl::Status SharedMemoryStatus(const SharedMemoryRegistry& registry, const Request& request,
                                Response* response) {
  auto regions = registry.Status(request.name());
  if (!regions.ok()) return regions.status();
  for (const SharedMemoryRegionInfo& info : *regions) {
    auto& status = (*response->mutable_regions())[info.name];
    status.set_name(info.name);
    status.set_key(info.key);
    status.set_offset(info.offset);
    status.set_byte_size(info.byte_size);
  }
  return absl::OkStatus();
}

// SystemSharedMemoryUnregister: "" removes every region; unknown names are OK.
template <class Request>
absl::Status UnregisterSharedMemory(SharedMemoryRegistry& registry, const Request& request) {
  return registry.Unregister(request.name());
}

}  // namespace simserve

#endif  // SIMSERVE_SERVER_SHARED_MEMORY_RPC_H_

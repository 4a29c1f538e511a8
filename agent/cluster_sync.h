// The cluster model as the ztunnel sees it: node-protocol Workload and Service messages, the
// full update for a new connection and the delta between two models.
#pragma once

#include <string>

#include "agent/model.h"
#include "weft/node/v1/node.pb.h"

namespace weft::agent {

// Every pod of the cluster (all nodes) with `enrolled` from the namespace/pod labels and
// `strict_mtls` from the PeerAuthentication in force for its namespace.
weft::node::v1::Workload workloadProto(const ClusterModel& model, const Pod& pod);
// A service with its endpoints: pod IPs of the pods its selector matches in its namespace.
weft::node::v1::Service serviceProto(const ClusterModel& model, const Service& service);

weft::node::v1::ClusterUpdate fullClusterUpdate(const ClusterModel& model);
// Upserts for what is new or changed in `after`, removals for what is gone (full=false).
weft::node::v1::ClusterUpdate clusterDelta(const ClusterModel& before, const ClusterModel& after);
bool isEmptyUpdate(const weft::node::v1::ClusterUpdate& update);

}  // namespace weft::agent

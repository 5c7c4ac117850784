// Gradient buckets whose collectives start during backward, as DDP's Reducer does: a post-accumulate-grad
// hook on every parameter moves its gradient into a flat buffer as soon as autograd has it, and the
// bucket's all-reduce (or, for ZeRO-2, its reduce to the rank that owns it) starts once its last
// gradient has arrived, on the engine's threads while backward goes on with earlier layers.
// Every rank runs the same graph, so the buckets start in the same order everywhere, as c10d needs.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <mutex>
#include <vector>

#include "group.h"

using wizard::guarded;

namespace {

struct Bucket {
  int64_t start;
  int64_t len;
  int root;  // -1: all-reduce
  size_t params_in;
  size_t pending;
};

struct ReducerState {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  std::vector<at::Tensor> params;
  std::vector<int64_t> offsets;
  std::vector<std::vector<size_t>> buckets_of_param;
  std::vector<bool> moved;
  std::vector<Bucket> buckets;
  // Buckets start strictly in index order (the layout follows backward's order), so every rank
  // issues the same collectives in the same order whatever autograd's scheduling.
  size_t next = 0;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  at::Tensor flat_grads;
  std::mutex mutex;
  bool armed = false;
  std::string error;

  void move_grad(size_t index) {
    moved[index] = true;
    auto& param = params[index];
    auto slot = flat_grads.narrow(0, offsets[index], param.numel());
    auto grad = param.grad();
    if (grad.defined()) {
      slot.copy_(grad.reshape({-1}));
      grad.zero_();
    } else {
      slot.zero_();
    }
  }

  // Issues bucket `next` and moves on, even if issuing it throws (the error still propagates).
  void start_next() {
    auto& bucket = buckets[next++];
    std::vector<at::Tensor> tensors{flat_grads.narrow(0, bucket.start, bucket.len)};
    if (bucket.root < 0) {
      works.push_back(backend->allreduce(tensors));
    } else {
      c10d::ReduceOptions options;
      options.rootRank = bucket.root;
      works.push_back(backend->reduce(tensors, options));
    }
  }

  void start_ready_buckets() {
    while (next < buckets.size() && buckets[next].pending == 0) start_next();
  }

  void deliver(size_t index) {
    move_grad(index);
    for (size_t b : buckets_of_param[index]) buckets[b].pending--;
  }

  void on_ready(size_t index) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!armed || !error.empty()) return;
    try {
      if (moved[index]) throw std::runtime_error("a gradient arrived twice in one armed backward");
      deliver(index);
      start_ready_buckets();
    } catch (const std::exception& e) {
      // Thrown out of a hook it would abort backward; finish() reports it instead.
      error = e.what();
    }
  }

  void reset() {
    armed = false;
    error.clear();
    works.clear();
    next = 0;
    std::fill(moved.begin(), moved.end(), false);
    for (auto& bucket : buckets) bucket.pending = bucket.params_in;
  }
};

struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  std::shared_ptr<ReducerState> state;
  size_t index;
  ReadyHook(std::shared_ptr<ReducerState> state, size_t index) : state(std::move(state)), index(index) {}
  void operator()(const torch::autograd::Variable&) override { state->on_ready(index); }
};

}  // namespace

struct WizardReducer {
  std::shared_ptr<ReducerState> state;
};

extern "C" {

// `params[i]` (tch handles) own `flat_grads[offsets[i] .. + numel)`; bucket b covers
// [starts[b], starts[b] + lens[b]) and is all-reduced (roots[b] < 0) or reduced to rank roots[b].
int wizard_reducer_new(WizardGroup* group, void** params, const int64_t* offsets, int64_t n_params,
                       void* flat_grads, const int64_t* starts, const int64_t* lens, const int* roots,
                       int64_t n_buckets, WizardReducer** out) {
  return guarded([&] {
    auto state = std::make_shared<ReducerState>();
    state->backend = group->backend;
    state->timeout = group->timeout;
    state->flat_grads = *static_cast<at::Tensor*>(flat_grads);
    for (int64_t b = 0; b < n_buckets; ++b) state->buckets.push_back(Bucket{starts[b], lens[b], roots[b], 0, 0});
    for (int64_t i = 0; i < n_params; ++i) {
      auto& param = *static_cast<at::Tensor*>(params[i]);
      state->params.push_back(param);
      state->offsets.push_back(offsets[i]);
      std::vector<size_t> mine;
      int64_t from = offsets[i], to = offsets[i] + param.numel();
      for (int64_t b = 0; b < n_buckets; ++b) {
        if (from < starts[b] + lens[b] && starts[b] < to) {
          mine.push_back(static_cast<size_t>(b));
          state->buckets[b].params_in++;
        }
      }
      state->buckets_of_param.push_back(std::move(mine));
    }
    state->moved.assign(state->params.size(), false);
    state->reset();
    for (size_t i = 0; i < state->params.size(); ++i) {
      torch::autograd::impl::set_post_acc_grad_hooks(state->params[i], std::make_unique<ReadyHook>(state, i));
    }
    *out = new WizardReducer{state};
  });
}

// From now until wizard_reducer_finish, gradients go to the flat buffer as autograd produces them.
void wizard_reducer_arm(WizardReducer* reducer) {
  std::lock_guard<std::mutex> lock(reducer->state->mutex);
  reducer->state->armed = true;
}

// Moves the gradients no hook delivered, starts the buckets still waiting (in order), and waits for
// every collective; `*early` gets how many buckets had started during backward. Even after a failure
// every bucket is started and waited for, so that the other ranks' collectives complete. Returns -1
// with the first failure's message.
int wizard_reducer_finish(WizardReducer* reducer, int64_t* early) {
  auto& state = *reducer->state;
  std::lock_guard<std::mutex> lock(state.mutex);
  std::string failure = state.error.empty() ? "" : "during backward: " + state.error;
  *early = static_cast<int64_t>(state.works.size());
  auto remember = [&](int status) {
    if (status != 0 && failure.empty()) failure = wizard::last_error();
  };
  remember(guarded([&] {
    for (size_t i = 0; i < state.params.size(); ++i) {
      if (!state.moved[i]) state.deliver(i);
    }
  }));
  // Whatever failed above, every bucket is issued now, each on its own.
  while (state.next < state.buckets.size()) remember(guarded([&] { state.start_next(); }));
  for (auto& work : state.works) remember(guarded([&] { work->wait(state.timeout); }));
  state.reset();
  if (failure.empty()) return 0;
  wizard::last_error() = failure;
  return -1;
}

void wizard_reducer_free(WizardReducer* reducer) {
  for (auto& param : reducer->state->params) torch::autograd::impl::set_post_acc_grad_hooks(param, nullptr);
  delete reducer;
}
}

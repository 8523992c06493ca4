// Fused sparse optimizers: one kernel per rule, applied to one row at a time.
//
// Each kernel receives the row's values w[dim], its optimizer slots s[...],
// the summed gradient g[dim] of that row in this batch, the learning rate and
// the row's update count t (1 for the row's first update). The formulas are
// written next to each kernel and match optax (or TensorFlow for FTRL, and
// FBGEMM for row-wise Adagrad) in float32.
#pragma once

#include <cmath>
#include <cstdint>

namespace monolith {

enum class OptimizerKind : int32_t {
  kSGD = 0,
  kMomentum = 1,
  kAdagrad = 2,
  kRowwiseAdagrad = 3,
  kAdam = 4,
  kAMSGrad = 5,
  kRMSProp = 6,
  kFTRL = 7,
};

// Hyperparameters of every rule; each rule reads the fields it names.
struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::kSGD;
  float momentum = 0.9f;             // Momentum: decay of the trace
  bool nesterov = false;             // Momentum: Nesterov's variant
  float b1 = 0.9f;                   // Adam, AMSGrad
  float b2 = 0.999f;                 // Adam, AMSGrad
  // 1 - b1, 1 - b2 and 1 - decay, computed in double from the user's numbers
  // before rounding to float, as optax does (1 - 0.999f is not 0.001f).
  float one_minus_b1 = 0.1f;
  float one_minus_b2 = 0.001f;
  float one_minus_decay = 0.1f;
  float eps = 1e-8f;                 // Adam, AMSGrad, Adagrad, RMSProp, row-wise Adagrad
  float eps_root = 0.0f;             // Adam, AMSGrad: inside the square root
  float initial_accumulator = 0.1f;  // Adagrad, row-wise Adagrad, FTRL (n), RMSProp (nu)
  float decay = 0.9f;                // RMSProp
  float l1 = 0.0f;                   // FTRL
  float l2 = 0.0f;                   // FTRL
  float beta = 0.0f;                 // FTRL
  float lr_power = -0.5f;            // FTRL
};

// Floats of optimizer state stored beside each row of dimension `dim`.
inline int SlotWidth(OptimizerKind kind, int dim) {
  switch (kind) {
    case OptimizerKind::kSGD: return 0;
    case OptimizerKind::kMomentum: return dim;        // trace
    case OptimizerKind::kAdagrad: return dim;         // sum of squares
    case OptimizerKind::kRowwiseAdagrad: return 1;    // mean square sum
    case OptimizerKind::kAdam: return 2 * dim;        // mu, nu
    case OptimizerKind::kAMSGrad: return 3 * dim;     // mu, nu, nu_max
    case OptimizerKind::kRMSProp: return dim;         // nu
    case OptimizerKind::kFTRL: return 2 * dim;        // z (linear), n (accum)
  }
  return 0;
}

// Initial values of a new row's slots.
inline void InitSlots(const OptimizerConfig& c, int dim, float* s) {
  const int width = SlotWidth(c.kind, dim);
  float fill = 0.0f;
  switch (c.kind) {
    case OptimizerKind::kAdagrad:
    case OptimizerKind::kRowwiseAdagrad:
    case OptimizerKind::kRMSProp:
      fill = c.initial_accumulator;
      break;
    case OptimizerKind::kFTRL:
      for (int i = 0; i < dim; ++i) s[i] = 0.0f;                        // z
      for (int i = 0; i < dim; ++i) s[dim + i] = c.initial_accumulator;  // n
      return;
    default:
      break;
  }
  for (int i = 0; i < width; ++i) s[i] = fill;
}

// Applies one step of rule `c.kind` to one row. `t` is the row's update
// count including this step (bias correction of Adam and AMSGrad).
inline void ApplyRule(const OptimizerConfig& c, int dim, float lr, uint32_t t,
                      const float* __restrict g, float* __restrict w,
                      float* __restrict s) {
  switch (c.kind) {
    case OptimizerKind::kSGD:
      // w -= lr * g
      for (int i = 0; i < dim; ++i) w[i] -= lr * g[i];
      return;
    case OptimizerKind::kMomentum: {
      // trace = g + momentum * trace; w -= lr * (nesterov ? g + momentum * trace : trace)
      const float m = c.momentum;
      if (c.nesterov) {
        for (int i = 0; i < dim; ++i) {
          const float tr = g[i] + m * s[i];
          s[i] = tr;
          w[i] -= lr * (g[i] + m * tr);
        }
      } else {
        for (int i = 0; i < dim; ++i) {
          const float tr = g[i] + m * s[i];
          s[i] = tr;
          w[i] -= lr * tr;
        }
      }
      return;
    }
    case OptimizerKind::kAdagrad:
      // acc += g^2; w -= lr * g / sqrt(acc + eps)   (optax.adagrad)
      for (int i = 0; i < dim; ++i) {
        const float acc = s[i] + g[i] * g[i];
        s[i] = acc;
        w[i] -= lr * g[i] / std::sqrt(acc + c.eps);
      }
      return;
    case OptimizerKind::kRowwiseAdagrad: {
      // acc += mean(g^2); w -= lr * g / (sqrt(acc) + eps)   (FBGEMM row-wise)
      float sq = 0.0f;
      for (int i = 0; i < dim; ++i) sq += g[i] * g[i];
      const float acc = s[0] + sq / static_cast<float>(dim);
      s[0] = acc;
      const float scale = lr / (std::sqrt(acc) + c.eps);
      for (int i = 0; i < dim; ++i) w[i] -= scale * g[i];
      return;
    }
    case OptimizerKind::kAdam:
    case OptimizerKind::kAMSGrad: {
      // mu = b1 mu + (1-b1) g; nu = b2 nu + (1-b2) g^2;
      // mu_hat = mu / (1 - b1^t); nu_hat = nu / (1 - b2^t)
      // Adam:    w -= lr * mu_hat / (sqrt(nu_hat + eps_root) + eps)
      // AMSGrad: nu_max = max(nu_max, nu_hat); w -= lr * mu_hat / (sqrt(nu_max + eps_root) + eps)
      float* mu = s;
      float* nu = s + dim;
      const float b1 = c.b1, b2 = c.b2;
      // In float32 from the rounded b1, b2, as optax computes them.
      const float bc1 = 1.0f - std::pow(b1, static_cast<float>(t));
      const float bc2 = 1.0f - std::pow(b2, static_cast<float>(t));
      const bool ams = c.kind == OptimizerKind::kAMSGrad;
      float* nu_max = s + 2 * dim;
      for (int i = 0; i < dim; ++i) {
        const float m = b1 * mu[i] + c.one_minus_b1 * g[i];
        const float v = b2 * nu[i] + c.one_minus_b2 * (g[i] * g[i]);
        mu[i] = m;
        nu[i] = v;
        float v_hat = v / bc2;
        if (ams) {
          v_hat = std::fmax(nu_max[i], v_hat);
          nu_max[i] = v_hat;
        }
        w[i] -= lr * (m / bc1) / (std::sqrt(v_hat + c.eps_root) + c.eps);
      }
      return;
    }
    case OptimizerKind::kRMSProp:
      // nu = decay nu + (1-decay) g^2; w -= lr * g / sqrt(nu + eps)   (optax.rmsprop)
      for (int i = 0; i < dim; ++i) {
        const float v = c.decay * s[i] + c.one_minus_decay * (g[i] * g[i]);
        s[i] = v;
        w[i] -= lr * g[i] / std::sqrt(v + c.eps);
      }
      return;
    case OptimizerKind::kFTRL: {
      // TensorFlow's FTRL-Proximal (lr = alpha):
      // n' = n + g^2; sigma = (n'^-p - n^-p) / lr; z += g - sigma w; n = n'
      // w = |z| <= l1 ? 0 : (sign(z) l1 - z) / ((beta + n^-p) / lr + 2 l2)
      float* z = s;
      float* n = s + dim;
      const float p = c.lr_power;
      const bool half = p == -0.5f;
      for (int i = 0; i < dim; ++i) {
        const float n_new = n[i] + g[i] * g[i];
        const float pow_new = half ? std::sqrt(n_new) : std::pow(n_new, -p);
        const float pow_old = half ? std::sqrt(n[i]) : std::pow(n[i], -p);
        const float sigma = (pow_new - pow_old) / lr;
        const float zi = z[i] + g[i] - sigma * w[i];
        z[i] = zi;
        n[i] = n_new;
        const float quadratic = (c.beta + pow_new) / lr + 2.0f * c.l2;
        if (std::fabs(zi) <= c.l1) {
          w[i] = 0.0f;
        } else {
          const float l1 = zi > 0.0f ? c.l1 : -c.l1;
          w[i] = (l1 - zi) / quadratic;
        }
      }
      return;
    }
  }
}

}  // namespace monolith

// The input image with a mask canvas over it: paint / erase with pointer events, clear, invert,
// undo, and load a mask (white = selected). Each change emits "mask": a black/white PNG data URL
// at the image's own size.
const RED = "#ff2050";

export default {
  template: `
    <div class="paletta-mask" style="position:relative;width:100%;line-height:0" data-slot="image">
      <img ref="img" :src="src" v-show="src" @load="loaded" draggable="false" alt="input image"
           style="width:100%;height:auto;display:block;user-select:none" />
      <canvas ref="canvas" v-show="src && editable" class="paletta-mask-canvas"
              style="position:absolute;left:0;top:0;width:100%;height:100%;opacity:0.55;touch-action:none;cursor:crosshair"
              @pointerdown="down" @pointermove="move" @pointerup="up" @pointercancel="up"></canvas>
    </div>`,
  props: { src: String, editable: Boolean, brush: Number, erase: Boolean },
  data() {
    return { drawing: false, last: null, history: [] };
  },
  watch: {
    src() {
      this.history = [];
      const c = this.$refs.canvas;
      if (c) c.getContext("2d").clearRect(0, 0, c.width, c.height);
    },
  },
  methods: {
    loaded() {
      const img = this.$refs.img, c = this.$refs.canvas;
      if (c.width !== img.naturalWidth || c.height !== img.naturalHeight) {
        c.width = img.naturalWidth;
        c.height = img.naturalHeight;
        this.history = [];
      }
    },
    ctx() {
      return this.$refs.canvas.getContext("2d");
    },
    ratio() {
      const c = this.$refs.canvas, r = c.getBoundingClientRect();
      return r.width ? c.width / r.width : 1;
    },
    point(e) {
      const c = this.$refs.canvas, r = c.getBoundingClientRect();
      return [((e.clientX - r.left) * c.width) / r.width, ((e.clientY - r.top) * c.height) / r.height];
    },
    snapshot() {
      const c = this.$refs.canvas;
      if (!c.width) return;
      this.history.push(this.ctx().getImageData(0, 0, c.width, c.height));
      if (this.history.length > 30) this.history.shift();
    },
    down(e) {
      if (!this.editable) return;
      this.$refs.canvas.setPointerCapture(e.pointerId);
      this.snapshot();
      this.drawing = true;
      this.last = this.point(e);
      this.stroke(this.last);
    },
    move(e) {
      if (!this.drawing) return;
      const p = this.point(e);
      this.stroke(p);
      this.last = p;
    },
    up() {
      if (!this.drawing) return;
      this.drawing = false;
      this.emitMask();
    },
    stroke(p) {
      const ctx = this.ctx(), width = (this.brush || 24) * this.ratio();
      ctx.globalCompositeOperation = this.erase ? "destination-out" : "source-over";
      ctx.strokeStyle = ctx.fillStyle = RED;
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.lineWidth = width;
      ctx.beginPath();
      ctx.moveTo(this.last[0], this.last[1]);
      ctx.lineTo(p[0], p[1]);
      ctx.stroke();
      ctx.beginPath();
      ctx.arc(p[0], p[1], width / 2, 0, 2 * Math.PI);
      ctx.fill();
      ctx.globalCompositeOperation = "source-over";
    },
    clear() {
      const c = this.$refs.canvas;
      this.snapshot();
      this.ctx().clearRect(0, 0, c.width, c.height);
      this.emitMask();
    },
    invert() {
      const c = this.$refs.canvas, copy = document.createElement("canvas");
      copy.width = c.width;
      copy.height = c.height;
      copy.getContext("2d").drawImage(c, 0, 0);
      this.snapshot();
      const ctx = this.ctx();
      ctx.clearRect(0, 0, c.width, c.height);
      ctx.fillStyle = RED;
      ctx.fillRect(0, 0, c.width, c.height);
      ctx.globalCompositeOperation = "destination-out";
      ctx.drawImage(copy, 0, 0);
      ctx.globalCompositeOperation = "source-over";
      this.emitMask();
    },
    undo() {
      const state = this.history.pop();
      if (!state) return;
      this.ctx().putImageData(state, 0, 0);
      this.emitMask();
    },
    load_mask(url) {
      const mask = new Image();
      mask.onload = () => {
        const c = this.$refs.canvas, t = document.createElement("canvas");
        t.width = c.width;
        t.height = c.height;
        const tc = t.getContext("2d");
        tc.drawImage(mask, 0, 0, c.width, c.height);
        const d = tc.getImageData(0, 0, c.width, c.height);
        for (let i = 0; i < d.data.length; i += 4) {
          const v = d.data[i];
          d.data[i] = 255; d.data[i + 1] = 32; d.data[i + 2] = 80; d.data[i + 3] = v;
        }
        this.snapshot();
        this.ctx().putImageData(d, 0, 0);
        this.emitMask();
      };
      mask.src = url;
    },
    emitMask() {
      const c = this.$refs.canvas, w = c.width, h = c.height;
      const white = document.createElement("canvas");
      white.width = w;
      white.height = h;
      const wc = white.getContext("2d");
      wc.drawImage(c, 0, 0);
      wc.globalCompositeOperation = "source-in";
      wc.fillStyle = "#fff";
      wc.fillRect(0, 0, w, h);
      const out = document.createElement("canvas");
      out.width = w;
      out.height = h;
      const oc = out.getContext("2d");
      oc.fillStyle = "#000";
      oc.fillRect(0, 0, w, h);
      oc.drawImage(white, 0, 0);
      this.$emit("mask", out.toDataURL("image/png"));
    },
  },
};

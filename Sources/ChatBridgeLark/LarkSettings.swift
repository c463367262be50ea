import Foundation

/// Lark / Feishu settings (`lark.*`).
public struct LarkSettings: Sendable, Equatable {
    /// How events arrive.
    public enum Mode: String, Sendable, CaseIterable {
        /// The long connection (no public URL needed).
        case websocket
        /// HTTPS callbacks to `POST /callbacks/lark`.
        case webhook
    }

    /// Which group messages are answered.
    public enum GroupReply: String, Sendable, CaseIterable {
        /// Only those that @-mention the bot itself (by its open_id, never its display name).
        case mention
        /// Every group message the app receives.
        case all
    }

    /// How an answer is shown.
    public enum CardMode: String, Sendable, CaseIterable {
        /// A CardKit card streamed into.
        case cardkit
        /// An interactive card patched while the model writes.
        case patch
        /// One text message.
        case off
    }

    public var appID: String
    public var appSecret: String
    public var verificationToken: String
    public var encryptKey: String
    /// `https://open.feishu.cn`, or `https://open.larksuite.com` for Lark.
    public var baseURL: String
    public var mode: Mode
    public var groupReply: GroupReply
    /// Answer in the message's thread; a thread is then its own conversation.
    public var replyInThread: Bool
    public var cardMode: CardMode
    public var cardUpdateInterval: Duration
    /// The long connection's settings (`lark.stream.*`).
    public var stream = Stream()

    /// `lark.stream.*`: the long connection.
    public struct Stream: Sendable, Equatable {
        /// Hosts the WebSocket URL from `/callback/ws/endpoint` may point at (a host or any subdomain of
        /// it); anything else is refused, so a forged endpoint answer cannot send the app's traffic elsewhere.
        public var hosts = ["feishu.cn", "larksuite.com", "larkoffice.com"]
        /// How long a ping may go unanswered before the connection counts as dead and is replaced.
        public var keepaliveTimeout: Duration = .seconds(10)
        /// The longest pause between reconnection attempts.
        public var maxBackoff: Duration = .seconds(60)
        public var initialBackoff: Duration = .seconds(1)
        public init() {}

        /// Whether the platform-supplied WebSocket URL may be used: `wss` on an allowed host (`ws` only on
        /// loopback, for local gateways).
        public func allows(_ url: String) -> Bool {
            guard let components = URLComponents(string: url), let scheme = components.scheme?.lowercased(),
                let host = components.host?.lowercased(), !host.isEmpty
            else { return false }
            let loopback = ["127.0.0.1", "localhost", "::1"].contains(host)
            guard scheme == "wss" || (scheme == "ws" && loopback) else { return false }
            return hosts.contains { allowed in
                let allowed = allowed.lowercased()
                return host == allowed || host.hasSuffix("." + allowed)
            }
        }
    }

    public init(
        appID: String = "", appSecret: String = "", verificationToken: String = "", encryptKey: String = "",
        baseURL: String = "https://open.feishu.cn", mode: Mode = .websocket, groupReply: GroupReply = .mention,
        replyInThread: Bool = false, cardMode: CardMode = .cardkit, cardUpdateInterval: Duration = .milliseconds(500)
    ) {
        self.appID = appID
        self.appSecret = appSecret
        self.verificationToken = verificationToken
        self.encryptKey = encryptKey
        self.baseURL = baseURL
        self.mode = mode
        self.groupReply = groupReply
        self.replyInThread = replyInThread
        self.cardMode = cardMode
        self.cardUpdateInterval = cardUpdateInterval
    }

    /// The app can call the OpenAPI (tokens, replies, bot info).
    public var hasCredentials: Bool { !appID.isEmpty && !appSecret.isEmpty }

    /// Lark is configured at all (an app id is set): its routes, replies and connection are active.
    public var isEnabled: Bool { !appID.isEmpty }

    /// Why the webhook route cannot accept events, or nil when it can: it never accepts unauthenticated ones.
    public var webhookConfigurationProblem: String? {
        if encryptKey.isEmpty && verificationToken.isEmpty {
            return "Lark webhook events cannot be authenticated: set lark.encrypt_key (CHATBRIDGE_LARK_ENCRYPT_KEY) and/or lark.verification_token (CHATBRIDGE_LARK_VERIFICATION_TOKEN) from the app's Events & Callbacks page"
        }
        return nil
    }
}
